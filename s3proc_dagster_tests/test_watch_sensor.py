"""The real `watch_directory_sensor`, evaluated with `build_sensor_context` on a real instance."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.support import Deployment
from s3proc_dagster.defs.files.sensors import watch_directory_sensor
from s3proc_dagster.defs.resources import Settings, resources_for
from s3proc_dagster.sources.watch import wait_for_ready


class Watcher:
    """One sensor over its own directory, ticked like the daemon ticks it."""

    def __init__(self, deployment: Deployment, root: Path, threshold_ms: int, ignore_initial: bool = False) -> None:
        self.deployment = deployment
        self.sensor = watch_directory_sensor
        settings = Settings(  # this sensor's own settings, whatever the session's deployment uses
            overrides={
                "WATCH_PATH": str(root),
                "STAGING_DIRECTORY": str(root / ".staging"),
                "ERROR_DIRECTORY": str(root / "errors"),
                "STABILITY_THRESHOLD_MS": str(threshold_ms),
                "IGNORE_INITIAL": str(ignore_initial).lower(),
            }
        )
        self.resources = resources_for(settings)
        self.cursor: str | None = None

    def tick(self, as_the_daemon: bool = False) -> list[str]:
        """`as_the_daemon`: the context a code server builds for the daemon's tick (with the
        instance's ref), not `build_sensor_context`'s."""
        if as_the_daemon:
            context = dg.SensorEvaluationContext(
                instance_ref=self.deployment.instance().get_ref(),
                last_tick_completion_time=None,
                last_run_key=None,
                cursor=self.cursor,
                repository_name=None,
                resources=self.resources,
            )
        else:
            context = dg.build_sensor_context(
                instance=self.deployment.instance(), cursor=self.cursor, resources=self.resources
            )
        with context:
            result = self.sensor.evaluate_tick(context)
        self.cursor = result.cursor
        return [r.run_key for r in result.run_requests or [] if r.job_name != "reconcile_job"]

    def tick_until_requested(self, timeout_s: float = 10) -> tuple[list[str], int]:
        deadline = time.monotonic() + timeout_s
        ticks = 0
        while True:
            ticks += 1
            keys = self.tick()
            if keys:
                return keys, ticks
            assert time.monotonic() < deadline, "never requested"
            time.sleep(0.05)  # the sensor's own poll interval, scaled down; bounded by the deadline


def test_file_is_requested_once_stable_exactly_once_and_again_when_modified(
    deployment: Deployment, tmp_path: Path
) -> None:
    root = tmp_path / "watch"
    (root / "errors").mkdir(parents=True)
    watcher = Watcher(deployment, root, threshold_ms=400)
    growing = root / "growing.csv"
    growing.write_text("a,b\n1,2\n")
    # A file older than the threshold is ready at first sight; make this one "just written"
    # whatever the machine's load delays the first tick by (an mtime ahead of the clock).
    now = time.time_ns()
    os.utime(growing, ns=(now, now + 3_600 * 10**9))
    assert watcher.tick() == []  # just seen: not stable yet
    first_seen = time.monotonic()
    with growing.open("a") as out:
        out.write("3,4\n")  # still being written: the stability clock restarts
    keys, _ = watcher.tick_until_requested()
    assert time.monotonic() - first_seen >= 0.4
    assert keys == [f"growing.csv:{growing.stat().st_size}:{growing.stat().st_mtime_ns}"]
    assert watcher.tick() == [] and watcher.tick() == []  # exactly once
    with growing.open("a") as out:
        out.write("5,6\n")
    again, _ = watcher.tick_until_requested()
    assert again != keys and again[0].startswith("growing.csv:")


def test_ignore_initial_temp_names_and_error_directory(deployment: Deployment, tmp_path: Path) -> None:
    root = tmp_path / "watch"
    (root / "errors").mkdir(parents=True)
    (root / "old.csv").write_text("a\n1\n")
    watcher = Watcher(deployment, root, threshold_ms=0, ignore_initial=True)
    assert watcher.tick() == []  # what was there at the first tick is skipped
    for name in ("upload.csv.part", "x.tmp", "dl.crdownload", "edit.csv~", ".hidden.csv", "errors/bad.csv"):
        (root / name).write_text("a\n1\n")
    (root / "new.csv").write_text("a\n1\n")
    keys = watcher.tick()
    assert [k.split(":")[0] for k in keys] == ["new.csv"]


def test_a_daemon_tick_waits_for_a_file_that_arrives_during_it_and_requests_it(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Dagster ticks a sensor once per 5-s daemon loop at most; a tick the daemon evaluates in
    threads (the project's instance) looks again every POLL_INTERVAL_MS until 3.5 s after it began, so a
    file written during it is requested by it, not by the next one."""
    root = tmp_path / "watch"
    (root / "errors").mkdir(parents=True)
    watcher = Watcher(deployment, root, threshold_ms=0)
    assert deployment.instance().get_settings("sensors")["use_threads"] is True
    assert watcher.tick() == []  # in-process (no instance ref): one look, nothing there
    arrived = threading.Timer(1.0, lambda: (root / "late.csv").write_text("a\n1\n"))
    arrived.start()
    try:
        keys = watcher.tick(as_the_daemon=True)
    finally:
        arrived.join()
    assert [k.split(":")[0] for k in keys] == ["late.csv"]
    assert watcher.tick(as_the_daemon=False) == []  # requested once


def test_a_wait_ends_at_its_budget_and_looks_less_often_when_a_look_is_slow() -> None:
    now = [0.0]
    looks: list[float] = []

    def look() -> list:
        looks.append(now[0])
        now[0] += 0.05  # one look costs 50 ms: the next comes no sooner than 500 ms after
        return []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    assert wait_for_ready(look, budget_s=4.0, interval_s=0.1, clock=lambda: now[0], sleep=sleep) == []
    assert now[0] == pytest.approx(4.0, abs=0.06)
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert looks[0] == pytest.approx(0.1) and all(g == pytest.approx(0.55) for g in gaps)
    # a drop arriving over several looks is asked for together, once a look finds no more
    found = iter([[], ["a"], ["b", "c"], [], ["late"]])
    got = wait_for_ready(lambda: next(found), budget_s=4.0, interval_s=0.1, clock=lambda: now[0], sleep=sleep)
    assert got == ["a", "b", "c"]
