"""Dagster's local compute logs, mirrored to the run worker's own output by a thread.

A run's stdout and stderr go to files the UI shows (its *stdout* / *stderr* tabs) and, so
that they still reach the terminal or the pod's log, back to where they went before.
Dagster's `LocalComputeLogManager` does the second part with a `tail -F` process and a
Python interpreter watching it for orphans, for each of the two streams: four processes a
run, 40 MB of the tree at four runs and two interpreter starts a run (docs/performance.md).
Here one thread per stream copies what the file gains to a duplicate of the stream's
original descriptor; it ends with the capture, after a last read, so nothing is lost.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from dagster._core.execution.compute_logs import _fileno, redirect_to_file
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._utils import ensure_file, touch_file

POLL_S = 0.1  # how soon a line written to the file reaches the terminal
JOIN_TIMEOUT_S = 10.0  # how long the end of a run waits for a terminal that does not read


class MirroringComputeLogManager(LocalComputeLogManager):
    """`LocalComputeLogManager`, its files and configuration unchanged, mirrored by threads."""

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> MirroringComputeLogManager:
        return cls(inst_data=inst_data, **config_value)  # the parent's names its own class

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        out = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        err = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        with mirrored(sys.stdout, out), mirrored(sys.stderr, err):
            yield CapturedLogContext(log_key)
        touch_file(self.complete_artifact_path(log_key))  # the capture is complete


@contextmanager
def mirrored(stream: IO, path: str) -> Generator[None, None, None]:
    """`stream` written to `path` (at the descriptor, so child processes' output too) and
    copied from there to where `stream` pointed before."""
    ensure_file(path)
    fd = _fileno(stream)
    if fd is None:  # a stream with no descriptor (a test runner's): Dagster captures nothing either
        yield
        return
    stream.flush()
    original = os.dup(fd)
    done = threading.Event()
    copier = threading.Thread(target=_copy, args=(path, original, done), name="compute-log-mirror", daemon=True)
    copier.start()
    try:
        with redirect_to_file(stream, path):
            yield
    finally:
        done.set()
        copier.join(timeout=JOIN_TIMEOUT_S)
        if not copier.is_alive():  # else a stalled terminal keeps it: the file has everything
            os.close(original)


def _copy(path: str, target: int, done: threading.Event) -> None:
    with open(path, "rb") as source:
        while True:
            finished = done.is_set()  # read once more after the capture ended
            while chunk := source.read(65536):
                view = memoryview(chunk)
                try:
                    while view:
                        view = view[os.write(target, view) :]
                except OSError:  # the terminal is gone: the file still has it all
                    return
            if finished:
                return
            done.wait(POLL_S)
