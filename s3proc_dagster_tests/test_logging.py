"""LOG_LEVEL and LOG_PRETTY, honoured where a user reads logs: the terminal and a run's logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.instigation_logger import get_instigation_log_records

from benchmarks.support import Deployment, promo_rows, write_csv
from s3proc_dagster.defs.files.sensors import watch_directory_sensor
from s3proc_dagster.defs.resources import Settings, resources_for
from s3proc_dagster.logs import LOGGER, PROGRESS
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.runs.compute_logs import MirroringComputeLogManager
from s3proc_dagster.runs.instance import write_instance
from s3proc_dagster_tests.pipeline_helpers import COMMAND_DIR


def process(deployment: Deployment, name: str, **env: str) -> tuple[subprocess.CompletedProcess, dg.DagsterRun]:
    """`s3proc process` of a fresh CSV with `env`; what it printed, and the run it made."""
    src = write_csv(deployment.watch / f"logs-{uuid.uuid4().hex[:8]}" / name, promo_rows(20))
    done = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "process", str(src)],
        cwd=COMMAND_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert deployment.store().get_by_path(str(src)).status is S.COMPLETED
    (record,) = deployment.instance().get_run_records(dg.RunsFilter(tags={"s3proc/source": str(src)}), limit=1)
    return done, record.dagster_run


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def test_log_pretty_false_writes_json_lines_from_the_product_logger(deployment: Deployment) -> None:
    done, run = process(deployment, "json.csv", LOG_PRETTY="false", LOG_LEVEL="info")
    lines = json_lines(done.stderr)
    ours = [line for line in lines if line.get("logger", "").startswith("s3proc")]
    assert ours, done.stderr
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in ours)
    assert any(line.get("fileId") for line in ours)  # a line about a file names it
    assert any("COMPLETED" in line["message"] for line in ours)
    # Dagster's own per-step event lines are not the user's terminal at info
    assert "STEP_SUCCESS" not in done.stderr and "STEP_START" not in done.stderr
    assert done.stdout.startswith("COMPLETED -> ")
    # the same lines, as lines, in the run's logs
    messages = [e.user_message for e in deployment.instance().all_logs(run.run_id) if e.dagster_event is None]
    assert any("COMPLETED ->" in m for m in messages)


def test_log_pretty_true_writes_readable_lines(deployment: Deployment) -> None:
    done, _ = process(deployment, "pretty.csv", LOG_PRETTY="true", LOG_LEVEL="info")
    assert json_lines(done.stderr) == []
    assert " INFO    s3proc." in done.stderr and "COMPLETED ->" in done.stderr


def info_lines(text: str) -> list[dict]:
    return [
        line for line in json_lines(text) if line.get("logger", "").startswith("s3proc") and line["level"] == "info"
    ]


@pytest.mark.parametrize("level", ["error", "debug"])
def test_log_level_decides_what_is_written(deployment: Deployment, level: str) -> None:
    info, info_run = process(deployment, "info.csv", LOG_PRETTY="false", LOG_LEVEL="info")
    other, other_run = process(deployment, f"{level}.csv", LOG_PRETTY="false", LOG_LEVEL=level)
    ours = [line for line in json_lines(other.stderr) if line.get("logger", "").startswith("s3proc")]
    run_lines = [e for e in deployment.instance().all_logs(other_run.run_id) if e.dagster_event is None]
    info_run_lines = [e for e in deployment.instance().all_logs(info_run.run_id) if e.dagster_event is None]
    if level == "error":
        assert [line for line in ours if line["level"] in ("info", "debug")] == []
        assert not [e for e in run_lines if "COMPLETED ->" in e.user_message]
    else:
        assert len(ours) > len(info_lines(info.stderr))
        assert any(line["level"] == "debug" for line in ours)
        assert "STEP_SUCCESS" in other.stderr  # Dagster's own event lines, at debug only
        dagsters = [line for line in other.stderr.splitlines() if "STEP_SUCCESS" in line]
        assert [json.loads(line)["logger"] for line in dagsters] == ["dagster"] * len(dagsters)  # JSON like ours
        assert len(run_lines) > len(info_run_lines)


@pytest.fixture
def product_loggers():
    """The `s3proc` loggers as they were: a sensor's settings reconfigure them for the process."""
    saved = {
        n: (logging.getLogger(n).level, [h.formatter for h in logging.getLogger(n).handlers])
        for n in (LOGGER, PROGRESS)
    }
    yield
    for name, (level, formatters) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler, formatter in zip(logger.handlers, formatters, strict=False):
            handler.setFormatter(formatter)


@pytest.mark.parametrize("level", ["error", "info"])
def test_a_sensor_ticks_lines_follow_log_level_and_log_pretty(
    deployment: Deployment, tmp_path: Path, capfd: pytest.CaptureFixture[str], product_loggers: None, level: str
) -> None:
    """The watch sensor's "still being written", as a tick the daemon asks the code server
    for: on the terminal (the code server's stderr, scripts/dev's) as the product's JSON line
    at info and not at all at error; Dagster printed it at INFO, colored, whatever the
    settings. The tick's own log, which the UI shows, keeps it at info."""
    root = tmp_path / "watch"
    (root / "errors").mkdir(parents=True)
    growing = root / "growing.csv"
    growing.write_text("a,b\n1,2\n")
    now = time.time_ns()
    os.utime(growing, ns=(now, now + 3_600 * 10**9))  # just written, whatever the machine's load
    settings = Settings(
        overrides={
            "WATCH_PATH": str(root),
            "STAGING_DIRECTORY": str(root / ".staging"),
            "ERROR_DIRECTORY": str(root / "errors"),
            "STABILITY_THRESHOLD_MS": "60000",
            "LOG_LEVEL": level,
            "LOG_PRETTY": "false",
        }
    )
    instance = deployment.instance()
    log_key = ["sensors", uuid.uuid4().hex]
    context = dg.SensorEvaluationContext(  # as a code server builds it for the daemon's tick
        instance_ref=instance.get_ref(),
        last_tick_completion_time=None,
        last_run_key=None,
        cursor=None,
        repository_name="__repository__",
        sensor_name="watch_directory_sensor",
        log_key=log_key,
        resources=resources_for(settings),
    )
    capfd.readouterr()
    with context:
        watch_directory_sensor.evaluate_tick(context)
    printed = capfd.readouterr()
    terminal = printed.out + printed.err
    assert "still being written" not in "".join(line for line in terminal.splitlines() if not line.startswith("{"))
    ours = [line for line in json_lines(terminal) if "still being written" in line.get("message", "")]
    kept = [r for r in get_instigation_log_records(instance, log_key) if "still being written" in r.get("msg", "")]
    if level == "error":
        assert ours == [] and kept == []
    else:
        assert [(line["logger"], line["level"]) for line in ours] == [("s3proc.sensors", "info")]
        assert ours[0]["message"] == "watch_directory_sensor: 1 file(s) still being written"
        assert len(kept) == 1


def test_a_runs_output_is_kept_for_the_ui_and_mirrored_back_by_a_thread_not_by_processes(tmp_path: Path) -> None:
    """What a run prints (itself or a process it starts) lands in the compute log files the
    UI reads and still reaches the worker's own stdout and stderr; Dagster's own manager
    starts four processes a run for the second part, this one none. In a process of its
    own, as a run worker, whose stdout and stderr are descriptors 1 and 2."""
    worker = f"""
import os, subprocess, sys, psutil
from s3proc_dagster.runs.compute_logs import MirroringComputeLogManager
from s3proc_dagster.runs.instance import write_instance
manager = MirroringComputeLogManager(base_dir={str(tmp_path / "logs")!r})
with manager.capture_logs(["run-1", "compute_logs", "abc"]):
    helpers = len(psutil.Process().children())
    print("printed by the run", flush=True)
    os.write(2, b"written to fd 2\\n")
    subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
print(f"helpers={{helpers}} complete={{manager.is_capture_complete(['run-1', 'compute_logs', 'abc'])}}")
"""
    done = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120, cwd=COMMAND_DIR)
    assert done.returncode == 0, done.stderr
    manager = MirroringComputeLogManager(base_dir=str(tmp_path / "logs"))
    key = ["run-1", "compute_logs", "abc"]
    stdout = Path(manager.get_captured_local_path(key, "out")).read_text()
    stderr = Path(manager.get_captured_local_path(key, "err")).read_text()
    assert stdout == "printed by the run\nfrom a child process\n" and stderr == "written to fd 2\n"
    assert done.stdout == stdout + "helpers=0 complete=True\n"  # mirrored whole, in order, no helper
    assert done.stderr == stderr
    write_instance(tmp_path / "home", max_concurrency=2)  # and it is the project's instance's
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert type(instance.compute_log_manager) is MirroringComputeLogManager
