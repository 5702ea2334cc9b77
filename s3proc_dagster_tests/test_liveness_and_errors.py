"""Which runs count as alive, and which errors a retry can cure."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import dagster as dg
import psutil
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType

from s3proc_dagster.errors import (
    ChecksumMismatch,
    ConversionError,
    FileBusy,
    ObjectUnreadable,
    UnsupportedFileError,
    VersionSuperseded,
    is_transient,
)
from s3proc_dagster.runs import liveness
from s3proc_dagster.runs.liveness import HEARTBEAT_TIMEOUT_S, Beat, reap_dead_runs


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


def test_a_run_that_succeeds_while_the_reaper_looks_at_it_keeps_its_success(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper lists the runs in flight, then asks whether each is alive: a run whose
    worker writes its success and exits in between is "not alive" then, yet not dead. It
    was reported failed over its success (a batch of 35 files seen FAILURE in the UI after
    every step had succeeded)."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        run = instance.create_run_for_job(dg.GraphDefinition("batch").to_job(), status=dg.DagsterRunStatus.STARTED)
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        started = psutil.Process(child.pid).create_time()
        child.wait(timeout=30)  # the worker's process, gone once it has written its end
        beat = Beat(socket.gethostname(), child.pid, started, time.time())
        instance.run_storage.set_cursor_values({f"s3proc/heartbeat/{run.run_id}": json.dumps(beat.__dict__)})
        judged = liveness.is_run_alive

        def succeeding(instance_: dg.DagsterInstance, run_id: str, now: float | None = None) -> bool:
            event = DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=run.job_name)
            instance.report_dagster_event(event, run_id)  # the worker's last write, just before this look
            return judged(instance_, run_id, now)

        monkeypatch.setattr(liveness, "is_run_alive", succeeding)
        assert reap_dead_runs(instance, ["batch"]) == []
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.SUCCESS

        killed = instance.create_run_for_job(dg.GraphDefinition("batch").to_job(), status=dg.DagsterRunStatus.STARTED)
        instance.run_storage.set_cursor_values({f"s3proc/heartbeat/{killed.run_id}": json.dumps(beat.__dict__)})
        monkeypatch.setattr(liveness, "is_run_alive", judged)
        assert [r.dagster_run.run_id for r in reap_dead_runs(instance, ["batch"])] == [killed.run_id]
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE  # a dead one still is
