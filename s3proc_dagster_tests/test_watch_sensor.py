"""The real `watch_directory_sensor`, evaluated with `build_sensor_context` on a real instance."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg

from benchmarks.support import Deployment
from s3proc_dagster.defs.files.sensors import watch_directory_sensor
from s3proc_dagster.defs.resources import Settings, resources_for


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

    def tick(self) -> list[str]:
        with dg.build_sensor_context(
            instance=self.deployment.instance(), cursor=self.cursor, resources=self.resources
        ) as context:
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
