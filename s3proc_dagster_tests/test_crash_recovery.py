"""A run killed with SIGKILL in the middle of a multipart upload, then crash recovery and a
rerun that resumes the upload from the parts S3 already has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster_tests.conftest import Deployment
from s3proc_dagster_tests.pipeline_helpers import execute, run_requests_under, sensor_tick

ROOT = Path(__file__).resolve().parents[1]


def open_uploads(deployment: Deployment, prefix: str) -> list[dict]:
    client = deployment.s3.client()
    return [
        u
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=deployment.s3.bucket, Prefix=prefix)
        for u in page.get("Uploads", [])
    ]


def parts_in_s3(deployment: Deployment, key: str) -> int:
    client = deployment.s3.client()
    uploads = open_uploads(deployment, key)
    if not uploads:
        return 0
    listed = client.list_parts(Bucket=deployment.s3.bucket, Key=key, UploadId=uploads[0]["UploadId"])
    return len(listed.get("Parts", []))


def test_killed_upload_is_recovered_and_resumed_once(deployment: Deployment) -> None:
    path = deployment.watch / "crash" / "big.bin"
    path.parent.mkdir(parents=True)
    with path.open("wb") as out:
        for _ in range(12):  # 96 MiB: twelve 8 MiB parts, seconds to upload through the proxy
            out.write(os.urandom(8 << 20))
    key = f"{deployment.prefix}/crash/big.bin"

    proc = subprocess.Popen(
        [sys.executable, "-m", "s3proc_dagster.cli", "process", str(path)],
        cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while parts_in_s3(deployment, key) < 3:  # kill it with some parts in S3, most still to send
            assert proc.poll() is None, "the run ended before its upload could be killed"
            assert time.monotonic() < deadline, "no multipart upload got going"
            time.sleep(0.05)  # polling interval, bounded by the deadline
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    store = deployment.store()
    record = store.get_by_path(str(path))
    assert record.status is S.IN_PROGRESS
    (task,) = store.list_upload_tasks(record.file_id)  # the UploadId was recorded as soon as S3 gave it
    assert [u["UploadId"] for u in open_uploads(deployment, key)] == [task.upload_id]

    recovered = dg.execute_job(
        dg.reconstructable(reconcile_job_with_resources), instance=deployment.instance()
    )
    assert recovered.success
    record = store.get_by_path(str(path))
    assert record.status is S.PENDING and "crash recovery" in record.error_details
    # this version's upload is kept for the rerun to resume; nothing else is left open
    assert [u["UploadId"] for u in open_uploads(deployment, key)] == [task.upload_id]
    killed = deployment.instance().get_run_records(
        dg.RunsFilter(job_name="process_file_job", tags={"s3proc/file_id": record.file_id})
    )
    assert killed[0].dagster_run.status == dg.DagsterRunStatus.FAILURE  # no longer shown as running

    # the watch sensor runs the PENDING file again, under a new run key
    (request,) = run_requests_under(sensor_tick(deployment), "crash")
    assert request.run_key.endswith(f"retry-{int(record.last_updated_at.timestamp() * 1000)}")
    puts_before = len(deployment.proxy.put_keys)
    assert execute(request, deployment).success
    sent_after_restart = [k for k in deployment.proxy.put_keys[puts_before:] if k.endswith(f"/{key}")]
    assert 0 < len(sent_after_restart) <= 12 - 3  # resumed: the parts already in S3 were not sent again

    final = store.get_by_path(str(path))
    assert final.status is S.COMPLETED
    assert [f.file_path for f in store.list_files() if f.file_path == str(path)] == [str(path)]
    client = deployment.s3.client()
    listed = client.list_objects_v2(Bucket=deployment.s3.bucket, Prefix=f"{deployment.prefix}/crash/")
    assert [o["Key"] for o in listed["Contents"]] == [key]
    assert open_uploads(deployment, f"{deployment.prefix}/crash/") == []
    got = client.get_object(Bucket=deployment.s3.bucket, Key=key)
    assert got["ContentLength"] == path.stat().st_size and got["Metadata"]["x-completed"] == "true"


def reconcile_job_with_resources() -> dg.JobDefinition:
    from s3proc_dagster.definitions import defs

    return defs.resolve_job_def("reconcile_job")
