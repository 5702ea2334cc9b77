"""Runs that can land on any node: a re-execution from failure on a node that never saw
the file (no snapshot, no extracted entries, no chunk files, no local step outputs) still
finishes, with exact data, without sending again a chunk S3 already holds; and a file
that changed meanwhile fails the run with a message saying so, the original left alone.

"Another node" is simulated on this machine: the staging area (and, for a shared
deployment, DAGSTER_HOME's step outputs) is wiped between the failed run and its
re-execution. Real SeaweedFS, real faults through the proxy, nothing mocked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.support import Deployment, csv_bytes, dataset_keys, list_keys, promo_rows, write_csv
from s3proc_dagster.defs.files.events import asset_key_for
from s3proc_dagster.errors import SourceChanged
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.files.parking import unpark
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.pipeline import Claimant, StepContext, staged_snapshot, take_snapshot
from s3proc_dagster.runs.batching import batch_request
from s3proc_dagster.runs.reconstructable import process_file_job_with_resources, process_files_job_with_resources
from s3proc_dagster.runs.requests import run_request_for
from s3proc_dagster.sources.resolve import resolve_source
from s3proc_dagster.stores.mongo import MongoProgressStore
from s3proc_dagster.stores.sqlite import SQLiteProgressStore
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.pipeline_helpers import (
    execute,
    read_dataset,
    reconcile,
    run_requests_under,
    sensor_tick,
    source_rows,
    write_zip,
)

ROWS = 120_001  # three chunks at the deployment's CHUNK_SIZE=50000


def staging(deployment: Deployment) -> Path:
    return Path(deployment.env["STAGING_DIRECTORY"])


def run_failing_puts(deployment: Deployment, run, containing: str) -> dg.ExecuteJobResult:
    """Run with S3 refusing every PUT to keys containing `containing` (the run fails for good)."""
    deployment.proxy.fail_puts_containing = containing
    try:
        result = run()
    finally:
        deployment.proxy.fail_puts_containing = None
    assert not result.success
    return result


def reexecute_from_failure(
    deployment: Deployment, failed: dg.ExecuteJobResult, job: Callable = process_file_job_with_resources
) -> dg.ExecuteJobResult:
    """As the UI's button does: from the failed step, with the parent run's tags (its files')."""
    instance = deployment.instance()
    parent_tags = instance.get_run_by_id(failed.run_id).tags
    return dg.execute_job(
        dg.reconstructable(job),
        instance=instance,
        reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance),
        tags={k: v for k, v in parent_tags.items() if k.startswith("s3proc/")},
        raise_on_error=False,
    )


def run_config(deployment: Deployment, config: dict) -> dg.ExecuteJobResult:
    return dg.execute_job(
        dg.reconstructable(process_file_job_with_resources),
        instance=deployment.instance(),
        run_config=config,
        raise_on_error=False,
    )


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def parts_put_since(deployment: Deployment, mark: int) -> list[str]:
    return [k for k in deployment.proxy.put_keys[mark:] if "/part-" in k]


def test_reexecution_on_a_node_without_staging_fetches_the_snapshot_again_and_resends_no_verified_chunk(
    deployment: Deployment, tmp_path: Path
) -> None:
    src = write_csv(deployment.watch / "anynode" / "promo.csv", promo_rows(ROWS, seed=151))
    sha, dataset = sha256_file(src), f"{deployment.prefix}/anynode/promo.csv"
    (request,) = run_requests_under(sensor_tick(deployment), "anynode")
    failed = run_failing_puts(deployment, lambda: execute(request, deployment), f"/{part_key(dataset, sha, 1)}")
    store = deployment.store()
    file_id = store.get_by_path(str(src)).file_id
    assert [c.status for c in store.list_chunks(file_id)] == [S.COMPLETED, S.FAILED, S.COMPLETED]
    verified = {c.chunk_index: (c.s3_key, c.sha256) for c in store.list_chunks(file_id) if c.status is S.COMPLETED}

    shutil.rmtree(staging(deployment))  # the node that re-executes has never seen the file
    mark = len(deployment.proxy.put_keys)
    again = reexecute_from_failure(deployment, failed)

    assert again.success
    assert {e.step_key for e in again.get_step_success_events()} == {
        "streaming",
        "integrity_verification",
        "progress_update",
    }
    assert parts_put_since(deployment, mark) == [f"/{deployment.s3.bucket}/{part_key(dataset, sha, 1)}"]
    chunks = store.list_chunks(file_id)
    assert [c.status for c in chunks] == [S.COMPLETED] * 3
    assert [(c.record_count, c.start_offset, c.end_offset) for c in chunks] == [
        (50_000, 0, 49_999),
        (50_000, 50_000, 99_999),
        (20_001, 100_000, 120_000),
    ]  # the chunks converted again have the first conversion's boundaries
    assert {i: (chunks[i].s3_key, chunks[i].sha256) for i in verified} == verified  # never replaced
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, sha, 3)
    parked = deployment.errors / "anynode" / "promo.csv"  # where the failed run moved the original
    assert not src.exists() and sha256_file(parked) == sha  # fetched from there, and left there
    assert read_dataset(deployment, dataset, tmp_path) == source_rows(parked, "read_csv")
    record = store.get_by_path(str(src))
    assert (record.status, record.checksum, record.processing_stats.successful_records) == (S.COMPLETED, sha, ROWS)
    assert not (staging(deployment) / sha).exists()  # released again once COMPLETED


def test_reexecution_without_staging_extracts_an_archive_again(deployment: Deployment, tmp_path: Path) -> None:
    members = {"rows.csv": csv_bytes(promo_rows(2_000, seed=152)), "docs/readme.txt": b"read me\n"}
    src = write_zip(deployment.watch / "anynode-zip" / "bundle.zip", members)
    (request,) = run_requests_under(sensor_tick(deployment), "anynode-zip")
    readme = f"{deployment.prefix}/anynode-zip/bundle.zip/docs/readme.txt"
    failed = run_failing_puts(deployment, lambda: execute(request, deployment), f"/{readme}")

    shutil.rmtree(staging(deployment))
    mark = len(deployment.proxy.put_keys)
    again = reexecute_from_failure(deployment, failed)

    assert again.success
    sent = [k.removeprefix(f"/{deployment.s3.bucket}/") for k in deployment.proxy.put_keys[mark:]]
    assert [k for k in sent if "/_manifest" not in k and "_symlink" not in k] == [readme]  # the CSV's chunk stayed
    body = deployment.s3.client().get_object(Bucket=deployment.s3.bucket, Key=readme)["Body"].read()
    assert body == members["docs/readme.txt"]
    rows_key = f"{deployment.prefix}/anynode-zip/bundle.zip/rows.csv"
    extracted = tmp_path / "rows.csv"
    extracted.write_bytes(members["rows.csv"])
    assert read_dataset(deployment, rows_key, tmp_path) == source_rows(extracted, "read_csv")
    store = deployment.store()
    entry = store.get_by_path(f"{src}!/docs/readme.txt")
    assert (entry.status, entry.processed_bytes) == (S.COMPLETED, len(members["docs/readme.txt"]))
    assert store.get_by_path(str(src)).status is S.COMPLETED


@pytest.fixture
def left_in_place(deployment: Deployment) -> Iterator[list[Path | str]]:
    """Files (paths) and incoming objects (keys) a test leaves where the sensors look, as
    new versions awaiting runs of their own: removed afterwards, so that no later test's
    sensor tick picks them up."""
    left: list[Path | str] = []
    yield left
    for item in left:
        if isinstance(item, Path):
            item.unlink(missing_ok=True)
        else:
            deployment.s3.client().delete_object(Bucket=deployment.s3.bucket, Key=item)


def test_an_object_overwritten_before_the_snapshot_is_fetched_again_fails_the_run_and_is_left_alone(
    deployment: Deployment, left_in_place: list[Path | str]
) -> None:
    client, bucket = deployment.s3.client(), deployment.s3.bucket
    key = "incoming/anynode-changed/promo.csv"
    left_in_place.append(key)
    client.put_object(Bucket=bucket, Key=key, Body=csv_bytes(promo_rows(ROWS, seed=153)))
    sha = sha256_file(write_bytes(deployment.root / "v1.csv", csv_bytes(promo_rows(ROWS, seed=153))))
    dataset = f"{deployment.prefix}/anynode-changed/promo.csv"
    config = {"ops": {"checksum_calculation": {"config": {"path": f"s3://{bucket}/{key}"}}}}
    failed = run_failing_puts(deployment, lambda: run_config(deployment, config), f"/{part_key(dataset, sha, 1)}")

    new_body = csv_bytes(promo_rows(ROWS, seed=154))  # a new version, same key
    client.put_object(Bucket=bucket, Key=key, Body=new_body)
    new_sha = sha256_file(write_bytes(deployment.root / "v2.csv", new_body))
    shutil.rmtree(staging(deployment))
    mark = len(deployment.proxy.put_keys)
    again = reexecute_from_failure(deployment, failed)

    assert not again.success
    (failure,) = again.get_step_failure_events()
    assert failure.step_key == "streaming"
    expected = (
        f"anynode-changed/promo.csv: the file changed since the run started: s3://{bucket}/{key} now has "
        f"sha256 {new_sha}, this run processes {sha}; the new version is left to a run of its own"
    )
    assert failure.step_failure_data.error.message.strip().endswith(expected)
    assert parts_put_since(deployment, mark) == []  # nothing of either version was sent
    record = deployment.store().get_by_path(f"s3://{bucket}/{key}")
    assert (record.status, record.checksum, record.error_details) == (S.FAILED, sha, f"streaming: {expected}")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == new_body  # untouched
    assert list(staging(deployment).iterdir()) == []  # the new bytes were not kept for this run
    assert list_keys(deployment, f"{dataset}/_manifest.json") == []  # no version committed


def test_a_local_file_replaced_after_its_run_failed_fails_the_reexecution_and_stays_in_place(
    deployment: Deployment, left_in_place: list[Path | str]
) -> None:
    src = write_csv(deployment.watch / "anynode-edited" / "promo.csv", promo_rows(ROWS, seed=156))
    left_in_place.append(src)
    sha, dataset = sha256_file(src), f"{deployment.prefix}/anynode-edited/promo.csv"
    (request,) = run_requests_under(sensor_tick(deployment), "anynode-edited")
    failed = run_failing_puts(deployment, lambda: execute(request, deployment), f"/{part_key(dataset, sha, 1)}")
    unpark(src, deployment.watch, deployment.errors)  # the user takes the file back to fix it...
    write_csv(src, promo_rows(ROWS, seed=157))  # ...and saves a new version
    new_sha, new_bytes = sha256_file(src), src.read_bytes()

    shutil.rmtree(staging(deployment))
    again = reexecute_from_failure(deployment, failed)

    assert not again.success
    (failure,) = again.get_step_failure_events()
    message = f"{src} now has sha256 {new_sha}, this run processes {sha}"
    assert message in failure.step_failure_data.error.message
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.FAILED and record.checksum == sha
    assert record.error_details.startswith("streaming: anynode-edited/promo.csv: the file changed since the run")
    assert record.error_details.endswith(
        f"; the original changed since the run started and stays at {src} for its new version's run"
    )
    assert src.read_bytes() == new_bytes  # the new version: not parked, not rewritten
    assert list((deployment.errors / "anynode-edited").iterdir()) == []


@pytest.fixture
def shared_deployment(
    deployment: Deployment, mongodb_uri: str, mongodb_database: str, monkeypatch: pytest.MonkeyPatch
) -> Deployment:
    """The deployment with DEPLOYMENT=shared (and, as that requires, a MongoDB store);
    settings are read when a run starts, so this test's runs see them."""
    monkeypatch.setenv("DEPLOYMENT", "shared")
    monkeypatch.setenv("MONGODB_URI", mongodb_uri)
    monkeypatch.setenv("MONGODB_DATABASE", mongodb_database)
    return deployment


def test_a_shared_deployment_keeps_step_outputs_as_json_outside_the_data_prefix_and_reexecutes_from_them(
    shared_deployment: Deployment, mongodb_uri: str, mongodb_database: str, tmp_path: Path
) -> None:
    deployment = shared_deployment
    src = write_csv(deployment.watch / "anynode-shared" / "promo.csv", promo_rows(ROWS, seed=155))
    sha, dataset = sha256_file(src), f"{deployment.prefix}/anynode-shared/promo.csv"
    config = {"ops": {"checksum_calculation": {"config": {"path": str(src)}}}}
    mark = len(deployment.proxy.put_keys)
    failed = run_failing_puts(deployment, lambda: run_config(deployment, config), f"/{part_key(dataset, sha, 1)}")
    outputs = f"{deployment.prefix}/_s3proc/step-outputs/"  # a folder no source may land in
    before = ["checksum_calculation", "type_detection", "archive_extraction", "parquet_conversion"]
    assert list_keys(deployment, outputs + failed.run_id + "/") == sorted(
        f"{outputs}{failed.run_id}/{step}/result.json" for step in before
    )
    document = deployment.s3.client().get_object(
        Bucket=deployment.s3.bucket, Key=f"{outputs}{failed.run_id}/checksum_calculation/result.json"
    )
    assert json.loads(document["Body"].read())[0]["version"]["sha256"] == sha  # data, not a pickle
    assert list_keys(deployment, f"{deployment.prefix}/_dagster/") == []
    local = Path(deployment.env["DAGSTER_HOME"]) / "storage"  # where FilesystemIOManager would write
    assert [step for step in before if (local / failed.run_id / step).exists()] == []

    shutil.rmtree(staging(deployment))  # another node: no snapshot, no chunks,
    shutil.rmtree(local / failed.run_id, ignore_errors=True)  # nothing of the run's on local disk
    again = reexecute_from_failure(deployment, failed)

    assert again.success
    assert {e.step_key for e in again.get_step_success_events()} == {
        "streaming",
        "integrity_verification",
        "progress_update",
    }
    loaded = [
        e.event_specific_data.upstream_step_key
        for e in again.all_events
        if e.event_type is dg.DagsterEventType.LOADED_INPUT and e.step_key == "streaming"
    ]
    assert sorted(loaded) == ["parquet_conversion"]  # the failed run's, from S3: one input per step
    steps = ["streaming", "integrity_verification", "progress_update"]
    assert [step for step in steps if (local / again.run_id / step).exists()] == []
    assert list_keys(deployment, outputs + again.run_id + "/") == [
        f"{outputs}{again.run_id}/{step}/result.json" for step in ("integrity_verification", "streaming")
    ]  # progress_update returns nothing
    bucket_prefix = f"/{deployment.s3.bucket}/{deployment.prefix}/"
    assert [k for k in deployment.proxy.put_keys[mark:] if not k.startswith(bucket_prefix)] == []
    parked = deployment.errors / "anynode-shared" / "promo.csv"
    assert read_dataset(deployment, dataset, tmp_path) == source_rows(parked, "read_csv")
    store = MongoProgressStore(mongodb_uri, mongodb_database)
    try:
        record = store.get_by_path(str(src))
        assert (record.status, record.checksum, record.processing_stats.completed_chunks) == (S.COMPLETED, sha, 3)
    finally:
        store.close()


def batch_refused(deployment: Deployment, batch: dg.RunRequest, refused: str) -> dg.ExecuteJobResult:
    """The batch run, with S3 refusing the step output document whose key ends in `refused`."""
    return run_failing_puts(
        deployment,
        lambda: dg.execute_job(
            dg.reconstructable(process_files_job_with_resources),
            instance=deployment.instance(),
            run_config=batch.run_config,
            tags=batch.tags,
            raise_on_error=False,
        ),
        refused,
    )


def test_a_batch_run_reexecuted_from_failure_runs_no_finished_files_steps(
    shared_deployment: Deployment, mongodb_uri: str, mongodb_database: str
) -> None:
    """A batch whose upload step did its work for every file but could not keep its output
    (S3 refused the step-output document): re-executed from failure, the upload step runs
    again and sends nothing twice, and no earlier step runs at all."""
    deployment = shared_deployment
    files = [write_csv(deployment.watch / "anynode-batch" / f"b{i}.csv", promo_rows(9, seed=i)) for i in range(3)]
    requests = [run_request_for(str(f), f"anynode-batch/{f.name}", f"anynode-batch/{f.name}:k") for f in files]
    batch = batch_request(requests)
    mark = len(deployment.proxy.put_keys)
    failed = batch_refused(deployment, batch, "/streaming/result.json")
    sent = parts_put_since(deployment, mark)
    assert len(set(sent)) == len(files)  # every file's part landed before the step failed
    again = reexecute_from_failure(deployment, failed, process_files_job_with_resources)
    assert again.success
    started = {e.step_key for e in again.all_events if e.event_type is dg.DagsterEventType.STEP_START}
    assert started == {"streaming", "integrity_verification", "progress_update"}
    assert parts_put_since(deployment, mark) == sent  # nothing sent again
    store = MongoProgressStore(mongodb_uri, mongodb_database)
    try:
        assert [store.get_by_path(str(f)).status for f in files] == [S.COMPLETED] * len(files)
    finally:
        store.close()


def test_a_batch_reexecuted_after_recovery_settled_its_files_takes_up_no_completed_file_again(
    shared_deployment: Deployment, mongodb_uri: str, mongodb_database: str, tmp_path: Path
) -> None:
    """A batch run fails after its verification step committed every file's dataset (S3
    refused the step's output document), and crash recovery settles its files: the two it
    finds whole COMPLETED, the one whose commit it cannot find (its manifest gone) PENDING.
    Re-executed from failure (the UI's button, a run retry), the run verifies and completes
    that one file and leaves the COMPLETED ones as they are (they were taken up again,
    COMPLETED -> PENDING -> COMPLETED, committed again and materialized a second time)."""
    deployment = shared_deployment
    folder = "anynode-settled"
    files = [write_csv(deployment.watch / folder / f"s{i}.csv", promo_rows(9, seed=40 + i)) for i in range(3)]
    batch = batch_request([run_request_for(str(f), f"{folder}/{f.name}", f"{folder}/{f.name}:k") for f in files])
    failed = batch_refused(deployment, batch, "/integrity_verification/result.json")
    datasets = [f"{deployment.prefix}/{folder}/{f.name}" for f in files]
    client = deployment.s3.client()
    client.delete_object(Bucket=deployment.s3.bucket, Key=f"{datasets[2]}/_manifest.json")
    assert reconcile(deployment).success
    store = MongoProgressStore(mongodb_uri, mongodb_database)
    try:
        settled = [store.get_by_path(str(f)) for f in files]
        assert [r.status for r in settled] == [S.COMPLETED, S.COMPLETED, S.PENDING]
        manifests = [client.head_object(Bucket=deployment.s3.bucket, Key=f"{d}/_manifest.json") for d in datasets[:2]]
        mark = len(deployment.proxy.put_keys)

        again = reexecute_from_failure(deployment, failed, process_files_job_with_resources)
        assert again.success
        started = {e.step_key for e in again.all_events if e.event_type is dg.DagsterEventType.STEP_START}
        assert started == {"integrity_verification", "progress_update"}
        materialized = [
            e.event_specific_data.materialization.asset_key
            for e in again.all_events
            if e.event_type is dg.DagsterEventType.ASSET_MATERIALIZATION
        ]
        assert materialized == [asset_key_for(deployment.prefix, f"{folder}/s2.csv")]
        assert [store.get_by_path(str(f)) for f in files[:2]] == settled[:2]  # not touched, not even PENDING
        assert store.get_by_path(str(files[2])).status is S.COMPLETED
        written = {
            k.split(f"/{folder}/", 1)[1].split("/", 1)[0] for k in deployment.proxy.put_keys[mark:] if folder in k
        }
        assert written == {"s2.csv"}  # only its dataset is committed again
        for manifest, dataset in zip(manifests, datasets, strict=False):
            now = client.head_object(Bucket=deployment.s3.bucket, Key=f"{dataset}/_manifest.json")
            assert (now["ETag"], now["LastModified"]) == (manifest["ETag"], manifest["LastModified"])
        for src, dataset in zip(files, datasets, strict=True):
            assert read_dataset(deployment, dataset, tmp_path) == source_rows(src, "read_csv")
    finally:
        store.close()


def test_a_missing_snapshot_is_fetched_from_where_the_file_is_or_was_parked_and_refused_once_changed(
    tmp_path: Path,
) -> None:
    """The domain alone (no Dagster, a SQLite store): `staged_snapshot` as a step calls it."""
    watch, errors, area = tmp_path / "incoming", tmp_path / "errors", tmp_path / "staging"
    src = write_bytes_in(watch / "in" / "a.csv", b"id,name\n1,one\n2,two\n")
    store = SQLiteProgressStore(tmp_path / "progress.db")
    try:
        ctx = StepContext(store, Claimant("run-1", lambda _: True), area, error_dir=errors)
        version = take_snapshot(ctx, resolve_source(str(src), watch))
        snap = Path(version.snapshot_path)

        shutil.rmtree(area)
        assert staged_snapshot(ctx, version) == snap and snap.read_bytes() == src.read_bytes()

        shutil.rmtree(area)
        parked = write_bytes_in(errors / "in" / "a.csv", src.read_bytes())
        src.write_bytes(b"id,name\n1,uno\n")  # a new version where the file was; the failed one parked
        assert staged_snapshot(ctx, version) == snap  # found in the error directory

        shutil.rmtree(area)
        parked.unlink()
        with pytest.raises(SourceChanged) as excinfo:
            staged_snapshot(ctx, version)
        assert str(excinfo.value) == (
            f"in/a.csv: the file changed since the run started: {src} now has sha256 {sha256_file(src)}, "
            f"this run processes {version.sha256}; the new version is left to a run of its own"
        )
        assert list(area.iterdir()) == []  # the other bytes are not kept

        src.unlink()
        with pytest.raises(SourceChanged, match=f"in/a.csv: the file changed since the run started: {src} is gone"):
            staged_snapshot(ctx, version)
    finally:
        store.close()


def write_bytes_in(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
