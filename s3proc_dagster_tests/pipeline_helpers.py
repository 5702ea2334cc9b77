"""Driving the deployment as its users do: drop files, tick the sensor, run what it asks for.

The deployment itself, S3 listings and the promotions data are `benchmarks/support.py`'s,
shared with the soak; the jobs `dg.reconstructable` runs are the product's
(`s3proc_dagster.runs.reconstructable`), so a run worker imports nothing of the tests.
"""

from __future__ import annotations

import atexit
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import duckdb

from s3proc_dagster.runs.reconstructable import (
    definitions,
    process_file_job_with_resources,
    reconcile_job_with_resources,
)

if TYPE_CHECKING:
    from benchmarks.support import Deployment

_CURSOR: dict[str, str | None] = {}


def sensor_tick(deployment: Deployment, **settings: str) -> list[dg.RunRequest]:
    """One evaluation of the real watch sensor, on the real instance, cursor carried over;
    `settings` override the deployment's for this tick (`MAX_CONCURRENCY="1"`)."""
    from s3proc_dagster.defs.resources import Settings, resources_for

    defs = definitions()
    sensor = defs.resolve_sensor_def("watch_directory_sensor")
    with dg.build_sensor_context(
        instance=deployment.instance(),
        cursor=_CURSOR.get(str(deployment.root)),
        resources=resources_for(Settings(overrides=settings)) if settings else defs.resources,
    ) as context:
        result = sensor.evaluate_tick(context)
    _CURSOR[str(deployment.root)] = result.cursor
    return list(result.run_requests or [])


def run_requests_under(requests: list[dg.RunRequest], folder: str) -> list[dg.RunRequest]:
    """The file runs a tick requested under `folder` (not the recovery runs it may also request)."""
    return [
        r
        for r in requests
        if r.tags.get("s3proc/path", "").startswith(folder + "/")
        or any(t.startswith(f"s3proc/file/{folder}/") for t in r.tags)  # a batch run: one tag per file
    ]


def execute(request: dg.RunRequest, deployment: Deployment) -> dg.ExecuteJobResult:
    return dg.execute_job(
        dg.reconstructable(process_file_job_with_resources),
        instance=deployment.instance(),
        run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
    )


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_tar_gz(path: Path, members: dict[str, bytes], pax_headers: dict[str, str] | None = None) -> Path:
    """`pax_headers`: PAX records written before every entry (the archive is then POSIX.1-2001)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax_headers or {}
            tf.addfile(info, io.BytesIO(data))
    return path


def write_gz(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))
    return path


def read_dataset(deployment: Deployment, dataset_key: str, tmp: Path) -> list[tuple]:
    """The dataset's current version, read as the README tells readers to: the parts its
    committed `_manifest.json` lists, in chunk order, with DuckDB."""
    client = deployment.s3.client()
    body = client.get_object(Bucket=deployment.s3.bucket, Key=f"{dataset_key}/_manifest.json")["Body"].read()
    keys = [c["key"] for c in sorted(json.loads(body)["chunks"], key=lambda c: c["chunkIndex"])]
    assert keys, f"no parquet under {dataset_key}"
    local = []
    for i, key in enumerate(keys):
        target = tmp / f"{abs(hash(dataset_key))}-{i:05d}.parquet"
        client.download_file(deployment.s3.bucket, key, str(target))
        local.append(str(target))
    return duckdb.sql(f"SELECT * FROM read_parquet({local!r})").fetchall()


ROOT = Path(__file__).resolve().parents[1]
# Where the tests start Dagster's commands: a folder with no `.env`. Dagster's CLI loads the
# `.env` of its working directory over the environment, so the one `scripts/dev` writes in
# the checkout pointed the tests' runs at the developer's SeaweedFS and progress store.
COMMAND_DIR = Path(tempfile.mkdtemp(prefix="s3proc-tests-cwd-"))
atexit.register(shutil.rmtree, COMMAND_DIR, True)


def start_process(*args: str) -> subprocess.Popen:
    """`s3proc process ARGS` as a user starts it, in its own process (so it can be killed)."""
    return subprocess.Popen(
        [sys.executable, "-m", "s3proc_dagster.cli", "process", *args],
        cwd=COMMAND_DIR,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def launch(job: str, run_config: dict, tags: dict[str, str] | None = None, env: dict[str, str] | None = None) -> None:
    """`dagster job launch` as a user types it: the run goes to the instance's queue."""
    command = [sys.executable, "-m", "dagster", "job", "launch", "-w", str(ROOT / "workspace.yaml"), "-j", job]
    command += ["--config-json", json.dumps(run_config)] + (["--tags", json.dumps(tags)] if tags else [])
    done = subprocess.run(
        command, cwd=COMMAND_DIR, env=env or os.environ.copy(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def graphql(ui: str, query: str, variables: dict) -> dict:
    """A query or mutation to the webserver's GraphQL endpoint, as the UI sends it; its data."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{ui}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


def reconcile(deployment: Deployment) -> dg.ExecuteJobResult:
    """One run of reconcile_job, as the sensor or the schedule would start it."""
    return dg.execute_job(dg.reconstructable(reconcile_job_with_resources), instance=deployment.instance())


def chunk_materializations(result: dg.ExecuteJobResult) -> list[tuple[str, int]]:
    """(step, chunk index) of every chunk materialization of a run, in order."""
    return [
        (e.step_key, e.event_specific_data.materialization.metadata["chunk_index"].value)
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
        and "chunk_index" in e.event_specific_data.materialization.metadata
    ]


def source_rows(path: Path, reader: str) -> list[tuple]:
    return duckdb.execute(f"SELECT * FROM {reader}($1)", [str(path)]).fetchall()
