"""Runs that die at the wrong moment, and what recovery makes of them (real SIGKILLs, real S3).

- killed mid-upload: recovered to PENDING, and the rerun resumes the multipart upload;
- killed before its first step: reported failed (never "running" for ever), file run again;
- killed while a new version lands: readers keep the old version, recovery does not trust
  the old version's manifest, and the new version lands on the rerun;
- S3 gone mid-upload: the retried upload resumes instead of leaking one per attempt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import dagster as dg
import psutil

from benchmarks.support import Deployment, dataset_keys, list_keys, open_uploads, promo_rows, wait_for, write_csv
from s3proc_dagster.defs.files.events import asset_key_for
from s3proc_dagster.defs.resources import Settings, resources_for
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import FileStatus
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.recovery import recover
from s3proc_dagster.runs.batching import batch_request
from s3proc_dagster.runs.liveness import Beat
from s3proc_dagster.runs.reconstructable import definitions, process_files_job_with_resources
from s3proc_dagster.stores.sqlite import SQLiteProgressStore
from s3proc_dagster.transfer.manifest import part_key, read_manifest
from s3proc_dagster_tests.pipeline_helpers import (
    execute,
    read_dataset,
    reconcile,
    run_requests_under,
    sensor_tick,
    source_rows,
    start_process,
)


def parts_in_s3(deployment: Deployment, key: str) -> int:
    uploads = open_uploads(deployment, key)
    if not uploads:
        return 0
    listed = deployment.s3.client().list_parts(Bucket=deployment.s3.bucket, Key=key, UploadId=uploads[0]["UploadId"])
    return len(listed.get("Parts", []))


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def runs_of(deployment: Deployment, **tags: str) -> list[dg.DagsterRun]:
    records = deployment.instance().get_run_records(dg.RunsFilter(job_name="process_file_job", tags=tags))
    return [r.dagster_run for r in records]


def test_killed_upload_is_recovered_and_resumed_once(deployment: Deployment) -> None:
    path = deployment.watch / "crash" / "big.bin"
    path.parent.mkdir()
    with path.open("wb") as out:
        for _ in range(12):  # 96 MiB: twelve 8 MiB parts, seconds to upload through the proxy
            out.write(os.urandom(8 << 20))
    key = f"{deployment.prefix}/crash/big.bin"

    proc = start_process(str(path))
    try:
        wait_for(lambda: proc.poll() is None and parts_in_s3(deployment, key) >= 3, "three parts in S3")
    finally:
        kill(proc)  # with some parts in S3 and most still to send

    store = deployment.store()
    record = store.get_by_path(str(path))
    assert record.status is S.IN_PROGRESS
    (task,) = store.list_upload_tasks(record.file_id)  # the UploadId was recorded as soon as S3 gave it
    assert [u["UploadId"] for u in open_uploads(deployment, key)] == [task.upload_id]

    assert reconcile(deployment).success
    record = store.get_by_path(str(path))
    assert record.status is S.PENDING and "crash recovery" in record.error_details
    # this version's upload is kept for the rerun to resume; nothing else is left open
    assert [u["UploadId"] for u in open_uploads(deployment, key)] == [task.upload_id]
    (killed,) = runs_of(deployment, **{"s3proc/file_id": record.file_id})
    assert killed.status == dg.DagsterRunStatus.FAILURE  # no longer shown as running

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
    assert list_keys(deployment, f"{deployment.prefix}/crash/") == [key]
    assert (
        open_uploads(deployment, f"{deployment.prefix}/crash/") == [] and store.list_upload_tasks(final.file_id) == []
    )
    got = deployment.s3.client().get_object(Bucket=deployment.s3.bucket, Key=key)
    assert got["ContentLength"] == path.stat().st_size and got["Metadata"]["x-completed"] == "true"


def test_run_killed_before_its_first_step_is_failed_and_its_file_runs_again(deployment: Deployment) -> None:
    key = "incoming/early/kill.csv"
    body = b"a,b\n1,2\n3,4\n"
    deployment.s3.client().put_object(Bucket=deployment.s3.bucket, Key=key, Body=body)
    uri = f"s3://{deployment.s3.bucket}/{key}"
    deployment.proxy.stalled.clear()
    deployment.proxy.release.clear()
    deployment.proxy.stall_method = "GET"  # the first step's snapshot read is held
    deployment.proxy.stall_containing = f"/{key}"
    proc = start_process(uri)
    try:
        wait_for(deployment.proxy.stalled.is_set, "the run to reach its first step")
        wait_for(
            lambda: [r.status for r in runs_of(deployment, **{"s3proc/source": uri})] == [dg.DagsterRunStatus.STARTED],
            "the run to show as started",
        )
    finally:
        kill(proc)
        deployment.proxy.stall_containing = deployment.proxy.stall_method = None
        deployment.proxy.release.set()
    (run,) = runs_of(deployment, **{"s3proc/source": uri})
    assert run.status == dg.DagsterRunStatus.STARTED  # Dagster alone would show it running for ever
    store = deployment.store()
    assert store.get_by_path(uri) is None  # it died before it could claim the file

    assert reconcile(deployment).success
    assert deployment.instance().get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    record = store.get_by_path(uri)
    assert record.status is S.PENDING and run.run_id in record.error_details

    sensor = definitions().resolve_sensor_def("s3_incoming_sensor")
    with dg.build_sensor_context(instance=deployment.instance(), resources=definitions().resources) as context:
        requests = [r for r in sensor.evaluate_tick(context).run_requests or [] if r.tags["s3proc/source"] == uri]
    (request,) = requests
    assert execute(request, deployment).success
    assert store.get_by_path(uri).status is S.COMPLETED


def test_crash_while_a_new_version_lands_never_trusts_the_old_manifest(deployment: Deployment, tmp_path) -> None:
    src = write_csv(deployment.watch / "vcrash" / "promo.csv", promo_rows(150_000, seed=21))
    dataset = f"{deployment.prefix}/vcrash/promo.csv"
    (request,) = run_requests_under(sensor_tick(deployment), "vcrash")
    assert execute(request, deployment).success
    v1, v1_rows = sha256_file(src), source_rows(src, "read_csv")

    write_csv(src, promo_rows(110_000, seed=22))  # a new version, three chunks again
    v2, v2_rows = sha256_file(src), source_rows(src, "read_csv")
    deployment.proxy.stalled.clear()
    deployment.proxy.release.clear()
    deployment.proxy.stall_containing = f"/{part_key(dataset, v2, 2)}"
    proc = start_process(str(src))
    try:
        wait_for(deployment.proxy.stalled.is_set, "the new version's upload to be under way")
    finally:
        kill(proc)
        deployment.proxy.stall_containing = None
        deployment.proxy.release.set()

    client = deployment.s3.client()
    assert read_manifest(client, deployment.s3.bucket, dataset).file_sha256 == v1
    assert read_dataset(deployment, dataset, tmp_path) == v1_rows  # readers still see the old version, whole
    store = deployment.store()
    assert store.get_by_path(str(src)).checksum == v2

    assert reconcile(deployment).success
    record = store.get_by_path(str(src))
    assert record.status is S.PENDING  # v1's manifest, intact as it is, is not v2's
    # kept: what readers see (v1, committed) and v2's chunks recorded COMPLETED (the rerun reuses them)
    landed_v2 = [c.s3_key for c in store.list_chunks(record.file_id) if c.status is S.COMPLETED and c.version == v2]
    assert part_key(dataset, v2, 2) not in landed_v2
    assert list_keys(deployment, dataset + "/") == sorted(dataset_keys(dataset, v1, 3) + landed_v2)
    assert open_uploads(deployment, dataset + "/") == []

    (rerun,) = run_requests_under(sensor_tick(deployment), "vcrash")
    assert execute(rerun, deployment).success
    assert store.get_by_path(str(src)).status is S.COMPLETED
    assert read_manifest(client, deployment.s3.bucket, dataset).file_sha256 == v2
    assert read_dataset(deployment, dataset, tmp_path) == v2_rows
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, v2, 3)  # v1's parts are gone


def test_s3_outage_mid_upload_resumes_and_leaves_no_unfinished_upload(deployment: Deployment) -> None:
    path = deployment.watch / "outage" / "big.bin"
    path.parent.mkdir()
    payload = os.urandom(6 * (8 << 20))
    path.write_bytes(payload)
    key = f"{deployment.prefix}/outage/big.bin"
    (request,) = run_requests_under(sensor_tick(deployment), "outage")
    failed_before = deployment.proxy.failed_requests
    deployment.proxy.outage_after_puts = (f"/{key}", 2, 1.5)  # after two parts, S3 is gone for 1.5 s
    # The shipped retry schedule (1 s, then 2 s), not the suite's 10 ms: what outlasts the
    # outage must be the product's retries, not how long a test machine happens to take.
    settings = Settings(overrides={"MAX_RETRIES": "3", "RETRY_DELAY_MS": "1000"})
    try:
        result = (
            definitions()
            .resolve_job_def("process_file_job")
            .execute_in_process(
                run_config=request.run_config,
                instance=deployment.instance(),
                tags=request.tags,
                resources=resources_for(settings),
                raise_on_error=False,
            )
        )
        assert result.success
    finally:
        deployment.proxy.outage_after_puts = None
    assert deployment.proxy.failed_requests > failed_before  # the outage happened
    assert open_uploads(deployment, key) == []
    store = deployment.store()
    record = store.get_by_path(str(path))
    assert record.status is S.COMPLETED and store.list_upload_tasks(record.file_id) == []
    assert deployment.s3.client().get_object(Bucket=deployment.s3.bucket, Key=key)["Body"].read() == payload


def held(store: SQLiteProgressStore, name: str, run_id: str) -> str:
    """A file recorded IN_PROGRESS by `run_id`, as its run's first step leaves it; its fileId."""
    status = FileStatus(file_id=f"race-{name}", file_path=f"/data/race/{name}", file_name=name, checksum="ab" * 32)
    store.record_detected(status)
    store.start(status.file_id, run_id)
    return status.file_id


def test_recovery_leaves_alone_what_a_finishing_run_settled_while_it_looked(tmp_path) -> None:
    """The domain alone, a real SQLite store: recovery lists the IN_PROGRESS files, then asks
    whether each holder is alive; a run that finishes in between is no longer alive, and has
    settled its files meanwhile. What it settled stays as it left it (it was set PENDING and
    processed again, or recovery failed on `COMPLETED to COMPLETED`); a file another run takes
    over while recovery works on it is left to that run, and the other dead runs' files are
    still settled."""
    store = SQLiteProgressStore(tmp_path / "progress.db")
    try:
        done, parked, taken, orphan = (held(store, n, f"run-{n}") for n in ("done", "parked", "taken", "orphan"))

        def finishing(run_id: str) -> bool:  # each holder finishes just as recovery asks about it
            if run_id == "run-done":
                store.complete(done, "race/done.csv", run_id=run_id)
            elif run_id == "run-parked":
                store.fail(parked, "parquet_conversion: ragged", run_id=run_id)
            return False  # a finished run is not alive, and neither is a killed one

        class TakenOver(SQLiteProgressStore):
            def recount(self, file_id: str) -> FileStatus:  # a re-execution takes the file over mid-way
                if file_id == taken:
                    self.hold(file_id, "run-again", lambda _: False, "ab" * 32)
                return super().recount(file_id)

        racing = TakenOver(tmp_path / "progress.db")
        try:
            settled = recover(racing, None, "bucket", finishing)
        finally:
            racing.close()
        assert [(r.file_id, r.outcome) for r in settled] == [(orphan, S.PENDING)]
        assert (store.require(done).status, store.require(done).run_id) == (S.COMPLETED, "run-done")
        assert store.require(parked).status is S.FAILED
        assert (store.require(taken).status, store.require(taken).run_id) == (S.IN_PROGRESS, "run-again")
    finally:
        store.close()


def test_a_killed_reexecution_of_a_finished_batch_sets_none_of_its_completed_files_pending(
    deployment: Deployment,
) -> None:
    """A batch run's files are COMPLETED (by the run itself, or by recovery once it died), then a
    re-execution of it (a run retry, the UI's button) is killed before it did anything. Recovery
    sets PENDING the files a dead run never reached unless they changed after that run began;
    a re-execution's files were claimed and finished by the run it re-executes, before it began,
    so they were all set PENDING and each processed once more by a run of its own."""
    files = [write_csv(deployment.watch / "deadretry" / f"r{i}.csv", promo_rows(6, seed=60 + i)) for i in range(2)]
    requests = run_requests_under(sensor_tick(deployment), "deadretry")  # the sensor has seen them
    batch = batch_request(requests)
    instance = deployment.instance()
    first = dg.execute_job(
        dg.reconstructable(process_files_job_with_resources),
        instance=instance,
        run_config=batch.run_config,
        tags=batch.tags,
    )
    assert first.success
    store = deployment.store()
    completed = [store.get_by_path(str(f)) for f in files]
    assert [r.status for r in completed] == [S.COMPLETED, S.COMPLETED]

    # what a re-execution killed in its start-up leaves: a run in flight whose worker is gone
    again = instance.create_run_for_job(
        definitions().resolve_job_def("process_files_job"),
        run_config=batch.run_config,
        tags=batch.tags,
        parent_run_id=first.run_id,
        root_run_id=first.run_id,
        status=dg.DagsterRunStatus.STARTED,
    )
    worker = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(worker.pid).create_time()
    worker.wait(timeout=30)
    beat = Beat(socket.gethostname(), worker.pid, started, time.time())
    instance.run_storage.set_cursor_values({f"s3proc/heartbeat/{again.run_id}": json.dumps(beat.__dict__)})

    assert reconcile(deployment).success
    assert instance.get_run_by_id(again.run_id).status == dg.DagsterRunStatus.FAILURE  # reported dead
    assert [store.get_by_path(str(f)) for f in files] == completed  # and its files left COMPLETED
    assert run_requests_under(sensor_tick(deployment), "deadretry") == []  # nothing to run again


def test_a_file_recovery_finds_landed_whole_is_materialized_in_the_catalog_by_the_reconcile_run(
    deployment: Deployment,
) -> None:
    """Its run died after the commit, before any step reported the landing: recovery
    COMPLETES it from the manifest, and the catalog's latest landing says so."""
    src = write_csv(deployment.watch / "recovered-landing" / "r.csv", promo_rows(12))
    (request,) = run_requests_under(sensor_tick(deployment), "recovered-landing")
    landed = execute(request, deployment)
    assert landed.success
    store = deployment.store()
    record = store.get_by_path(str(src))
    store.reset_to_pending(record.file_id)  # as the dead run left it: IN_PROGRESS, held by it, output committed
    store.start(record.file_id, landed.run_id)
    recovered = reconcile(deployment)
    assert recovered.success and store.require(record.file_id).status is S.COMPLETED
    key = asset_key_for(deployment.prefix, "recovered-landing/r.csv")
    (event,) = [
        e.event_specific_data.materialization
        for e in recovered.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key == key
    ]
    assert event.metadata["completed_by"].value == "crash recovery (reconcile_job)"
    assert event.metadata["sha256"].value == record.checksum and event.metadata["rows"].value == 12
