"""Which runs count as alive, and which errors a retry can cure."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from s3proc_dagster.errors import (
    ChecksumMismatch,
    ConversionError,
    FileBusy,
    ObjectUnreadable,
    UnsupportedFileError,
    VersionSuperseded,
    is_transient,
)
from s3proc_dagster.runs.liveness import HEARTBEAT_TIMEOUT_S, Beat


def test_a_beat_from_this_host_is_alive_exactly_while_its_process_is() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        beat = Beat(socket.gethostname(), child.pid, psutil.Process(child.pid).create_time(), time.time())
        assert beat.is_fresh(time.time())
    finally:
        child.kill()
        child.wait(timeout=10)
    assert not beat.is_fresh(time.time())  # no waiting for a timeout on the same host


def test_a_reused_pid_is_another_process_not_the_run() -> None:
    me = Beat.now()
    assert me.is_fresh(time.time())
    reused = Beat(me.host, os.getpid(), me.pid_started - 3600, me.at)
    assert not reused.is_fresh(time.time())


def test_a_beat_from_another_host_lives_until_its_timeout() -> None:
    now = time.time()
    assert Beat("other-node", 1, 0.0, now - 5).is_fresh(now)
    assert not Beat("other-node", 1, 0.0, now - HEARTBEAT_TIMEOUT_S - 1).is_fresh(now)


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied"),
        FileNotFoundError(errno.ENOENT, "No such file"),
        UnsupportedFileError("x.zip: named .zip but is not a zip archive"),
        ConversionError("ragged"),
        VersionSuperseded("newer version"),
        ValueError("bad value"),
    ],
)
def test_bad_input_and_refused_access_are_permanent(error: Exception) -> None:
    assert not is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        OSError(errno.ENOSPC, "No space left on device"),
        ChecksumMismatch("cut short"),
        ObjectUnreadable("503"),
        FileBusy("held", "run-1"),
        TimeoutError(),
    ],
)
def test_network_s3_and_contention_errors_are_retried(error: Exception) -> None:
    assert is_transient(error)


def test_s3_access_errors_are_permanent_and_throttling_is_not() -> None:
    class ClientError(Exception):
        def __init__(self, code: str) -> None:
            self.response = {"Error": {"Code": code}}

    assert not is_transient(ClientError("AccessDenied"))
    assert not is_transient(ClientError("NoSuchBucket"))
    assert is_transient(ClientError("SlowDown"))
