"""Is a run alive? Dagster's run status first, then a heartbeat for what Dagster cannot see.

A file's claim is only as good as its holder's liveness. Dagster knows a run's status,
but with the default run launcher nothing notices a run worker that was SIGKILLed or
OOM-killed, or a `s3proc process` whose process vanished: the run stays STARTED for
ever. So every run of the product beats a heartbeat into the Dagster instance's own
key-value storage (shared by every node when the instance is on PostgreSQL) from the
moment its resources are set up:

- a run that Dagster reports finished, failed or canceled is dead;
- a QUEUED run is alive (it holds nothing yet);
- a started run is alive while its heartbeat is fresh; on the same host a beat whose
  process no longer exists (or is another process with a reused pid) is dead at once,
  elsewhere after `HEARTBEAT_TIMEOUT_S` without a beat;
- a run with no heartbeat yet gets `START_GRACE_S` from leaving the queue to begin beating.

`reap_dead_runs` reports dead runs failed, so the UI never shows a killed run as
running, and their files can be recovered.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
import psutil

HEARTBEAT_S = 5.0
HEARTBEAT_TIMEOUT_S = 45.0  # nine missed beats: a busy machine, not a dead run
START_GRACE_S = 120.0
_KEY = "s3proc/heartbeat/"
IN_FLIGHT = (
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)


@dataclass(frozen=True)
class Beat:
    host: str
    pid: int
    pid_started: float  # the process's create time: a reused pid is another process
    at: float

    @classmethod
    def now(cls) -> Beat:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, psutil.Process(pid).create_time(), time.time())

    def is_fresh(self, now: float) -> bool:
        if self.host == socket.gethostname():
            try:
                return abs(psutil.Process(self.pid).create_time() - self.pid_started) < 1.0
            except psutil.NoSuchProcess:
                return False
        return now - self.at < HEARTBEAT_TIMEOUT_S


class Heartbeat:
    """Beats for one run from a daemon thread until stopped (or the process dies)."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str) -> None:
        self._instance, self._run_id = instance, run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()  # before any work: a run that claims a file has already beaten once
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=HEARTBEAT_S * 2)

    def _beat(self) -> None:
        beat = Beat.now()
        self._instance.run_storage.set_cursor_values({_KEY + self._run_id: json.dumps(beat.__dict__)})

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                self._beat()


def last_beat(instance: dg.DagsterInstance, run_id: str) -> Beat | None:
    raw = instance.run_storage.get_cursor_values({_KEY + run_id}).get(_KEY + run_id)
    return Beat(**json.loads(raw)) if raw else None


def is_run_alive(instance: dg.DagsterInstance, run_id: str, now: float | None = None) -> bool:
    record = instance.get_run_record_by_id(run_id)
    if record is None:
        return False
    status = record.dagster_run.status
    if status is dg.DagsterRunStatus.QUEUED:
        return True
    if status not in IN_FLIGHT:
        return False
    now = time.time() if now is None else now
    beat = last_beat(instance, run_id)
    if beat is not None:
        return beat.is_fresh(now)
    # A run waits in the queue as long as it must (QUEUED is alive, above); its grace starts
    # when it left the queue: its start, or else its last status change (to STARTING).
    started = record.start_time or record.update_timestamp.timestamp()
    return now - started < START_GRACE_S


def run_is_alive(instance: dg.DagsterInstance, exclude_run_id: str | None = None) -> Callable[[str], bool]:
    """A liveness predicate for the domain layer (which knows nothing of Dagster)."""

    def alive(run_id: str) -> bool:
        return run_id == exclude_run_id or is_run_alive(instance, run_id)

    return alive


def _dead(instance: dg.DagsterInstance, job_names: list[str], exclude_run_id: str | None) -> list[dg.RunRecord]:
    """In-flight runs of these jobs whose worker is gone.

    `is_run_alive` says "not alive" of a run that finished since it was listed as much as of
    one whose worker died; a worker writes its run's end before its process exits, so the
    status read again after that verdict tells them apart. Without it, a run that succeeded
    while being looked at was reported failed over its success."""
    records = instance.get_run_records(dg.RunsFilter(statuses=list(IN_FLIGHT)))
    dead = []
    for record in records:
        run_id = record.dagster_run.run_id
        if record.dagster_run.job_name not in job_names or run_id == exclude_run_id:
            continue
        if is_run_alive(instance, run_id):
            continue
        now = instance.get_run_by_id(run_id)
        if now is not None and now.status in IN_FLIGHT:
            dead.append(record)
    return dead


def dead_runs(instance: dg.DagsterInstance, job_names: list[str]) -> list[str]:
    """Ids of in-flight runs of these jobs whose worker is gone (a cheap look: runs in flight only)."""
    return [r.dagster_run.run_id for r in _dead(instance, job_names, None)]


def reap_dead_runs(
    instance: dg.DagsterInstance, job_names: list[str], exclude_run_id: str | None = None
) -> list[dg.RunRecord]:
    """Report every in-flight run of these jobs that is not alive as failed; return them."""
    reaped = _dead(instance, job_names, exclude_run_id)
    for record in reaped:
        instance.report_run_failed(
            record.dagster_run,
            "The run's worker is gone (killed or crashed: no heartbeat); reconcile_job recovers its files.",
        )
        # A dead upload step still holds its `s3_uploads` pool slot; the daemon frees slots of
        # finished runs only after `free_slots_after_run_end_seconds`, and not at all where no
        # daemon runs (s3proc process alone), so later uploads would wait for it for ever.
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return reaped
