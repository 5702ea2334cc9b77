"""What the Dagster UI shows, in a real headless Chromium against `dagster dev`."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.support import Deployment, promo_rows, write_csv
from s3proc_dagster.models import make_file_id
from s3proc_dagster_tests.pipeline_helpers import execute, run_requests_under, sensor_tick

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian's chromium is not installed (scripts/test installs it as root)"
    ),
]


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def chromium(url: str, *args: str) -> str:
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"chromium-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1500,1000",
        "--virtual-time-budget=20000",
        *args,
        url,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    return result.stdout


def rendered(url: str, ready: Callable[[str], bool], deadline_s: float = 180) -> str:
    """The page's DOM once `ready` says it shows what it should: on a busy machine the UI's
    queries may outlast one load's time budget, so the page is loaded again until then."""
    deadline = time.monotonic() + deadline_s
    while True:
        dom = chromium(url, "--dump-dom")
        if ready(dom) or time.monotonic() > deadline:
            return dom


def test_ui_shows_runs_and_chunk_materializations(deployment: Deployment, dagster_dev: str, tmp_path: Path) -> None:
    write_csv(deployment.watch / "ui" / "promo_ui.csv", promo_rows(120_001, seed=5))
    write_csv(deployment.watch / "ui" / "second.csv", promo_rows(10, seed=6))
    run_ids = []
    for request in run_requests_under(sensor_tick(deployment), "ui"):
        result = execute(request, deployment)
        assert result.success
        run_ids.append(result.run_id)

    # each run's page (the list's first page may hold newer runs of other tests' files)
    for run_id in run_ids:
        run_dom = rendered(f"{dagster_dev}/runs/{run_id}", lambda dom: "process_file_job" in dom)
        assert "process_file_job" in run_dom and run_id[:8] in run_dom
    chromium(f"{dagster_dev}/runs", f"--screenshot={tmp_path / 'runs.png'}")

    asset_url = f"{dagster_dev}/assets/{deployment.prefix}/ui/promo_ui.csv?view=events"
    asset_dom = rendered(asset_url, lambda dom: "rows 120001" in visible_text(dom))
    chromium(asset_url, f"--screenshot={tmp_path / 'asset.png'}")
    text = visible_text(asset_dom)
    # the events list: one row per materialization (3 chunks, then the file), newest selected
    events = re.findall(r"\b[A-Z][a-z]{2} \d{1,2}, \d{1,2}:\d{2} [AP]M\b", text)
    assert len(events) >= 4, text[:2000]
    # by the run that processed it: the test's own, or the daemon's sensor's if it saw the
    # file first (the other then skipped it as held)
    landed = deployment.store().get(make_file_id("ui/promo_ui.csv"))
    assert landed is not None and f"Materialized in run {landed.run_id[:8]}" in text
    assert "rows 120001" in text and "chunks 3" in text and "s3://" in text
    for shot in ("runs.png", "asset.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
    keep = os.environ.get("S3PROC_SCREENSHOTS")
    if keep:
        for shot in ("runs.png", "asset.png"):
            shutil.copy(tmp_path / shot, Path(keep) / shot)
