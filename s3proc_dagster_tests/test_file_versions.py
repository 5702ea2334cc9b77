"""A file version is (path, SHA-256): what lands, what is skipped, and who may work on it."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.support import Deployment, dataset_keys, list_keys, promo_rows, write_csv
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.transfer.manifest import read_manifest
from s3proc_dagster_tests.pipeline_helpers import (
    COMMAND_DIR,
    chunk_materializations,
    execute,
    read_dataset,
    run_requests_under,
    sensor_tick,
    source_rows,
    start_process,
)


def test_a_changed_file_with_the_same_row_count_lands_its_new_data(deployment: Deployment, tmp_path) -> None:
    src = write_csv(deployment.watch / "samecount" / "promo.csv", promo_rows(120_001, seed=31))
    dataset = f"{deployment.prefix}/samecount/promo.csv"
    (first,) = run_requests_under(sensor_tick(deployment), "samecount")
    assert execute(first, deployment).success
    write_csv(src, promo_rows(120_001, seed=32))  # same rows, same chunk offsets, other values
    sha = sha256_file(src)
    (second,) = run_requests_under(sensor_tick(deployment), "samecount")
    result = execute(second, deployment)
    assert result.success
    chunks = [
        e.event_specific_data.materialization.metadata
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION" and "reused" in e.event_specific_data.materialization.metadata
    ]
    assert [m["reused"].value for m in chunks] == [False, False, False]  # nothing taken from the old version
    assert read_dataset(deployment, dataset, tmp_path) == source_rows(src, "read_csv")
    assert read_manifest(deployment.s3.client(), deployment.s3.bucket, dataset).file_sha256 == sha
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, sha, 3)  # the old version is gone
    records = deployment.store().list_chunks(deployment.store().get_by_path(str(src)).file_id)
    assert {c.version for c in records} == {sha} and all(c.status is S.COMPLETED for c in records)


def test_two_runs_of_one_file_at_once_upload_each_chunk_once(deployment: Deployment, tmp_path) -> None:
    src = write_csv(deployment.watch / "twice" / "promo.csv", promo_rows(150_000, seed=41))
    dataset = f"{deployment.prefix}/twice/promo.csv"
    puts_before = len(deployment.proxy.put_keys)
    procs = [start_process(str(src)) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    parts = [k for k in deployment.proxy.put_keys[puts_before:] if f"/{dataset}/" in k and "/part-" in k]
    assert len(parts) == 3 and len(set(parts)) == 3  # every chunk sent exactly once
    logs = "".join(err for _, err in outputs)
    assert "is already processing this version" in logs or "unchanged" in logs  # the other run stood down
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.COMPLETED
    assert read_dataset(deployment, dataset, tmp_path) == source_rows(src, "read_csv")


def test_a_file_that_cannot_be_parked_says_so_in_its_record_and_status(deployment: Deployment) -> None:
    bad = deployment.watch / "noparking" / "bad.zip"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a zip archive")
    deployment.errors.mkdir(parents=True, exist_ok=True)
    (deployment.errors / "noparking").write_text("a file where the folder would go: the move must fail")
    (request,) = run_requests_under(sensor_tick(deployment), "noparking")
    assert not execute(request, deployment).success
    record = deployment.store().get_by_path(str(bad))
    assert record.status is S.FAILED
    assert "not a zip" in record.error_details and "could not be moved to ERROR_DIRECTORY" in record.error_details
    assert bad.read_bytes() == b"this is not a zip archive"  # left where it was, unchanged
    shown = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "status", str(bad)],
        cwd=COMMAND_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "could not be moved to ERROR_DIRECTORY" in shown.stdout


def test_a_conversion_that_fails_midway_leaves_no_parts_behind(deployment: Deployment) -> None:
    src = numbered_csv(deployment.watch / "midway" / "orders.csv", 1_000_000, last="one,two,three\n")
    dataset = f"{deployment.prefix}/midway/orders.csv"
    mark = len(deployment.proxy.put_keys)
    (request,) = run_requests_under(sensor_tick(deployment), "midway")
    result = execute(request, deployment)
    assert not result.success
    record = deployment.store().get_by_path(str(src))
    assert record is None or record.status is S.FAILED
    work = deployment.root / "staging" / f"{sha256_file(deployment.errors / 'midway' / 'orders.csv')}.work"
    assert not list(work.rglob("*.parquet"))
    # chunks landed while the conversion went on; the failure took them back, objects and records
    assert any(f"/{dataset}/" in k and "/part-00000" in k for k in deployment.proxy.put_keys[mark:])
    assert list_keys(deployment, dataset + "/") == []
    assert record is None or deployment.store().list_chunks(record.file_id) == []


def numbered_csv(path, rows: int, last: str):
    """`rows` numbered records (40 MB for a million: DuckDB reads past its first buffers
    before it meets `last`, so whole chunks land first), then the line `last`."""
    import duckdb

    path.parent.mkdir(parents=True, exist_ok=True)
    duckdb.execute(f"COPY (SELECT i AS n, 'x' || i AS label FROM range({rows}) t(i)) TO '{path}' (HEADER)")
    with path.open("a") as out:
        out.write(last)
    return path


def test_a_big_files_chunks_land_while_it_converts_each_sent_and_materialized_once(
    deployment: Deployment, tmp_path
) -> None:
    src = write_csv(deployment.watch / "overlap" / "promo.csv", promo_rows(170_000, seed=71))
    dataset = f"{deployment.prefix}/overlap/promo.csv"
    mark = len(deployment.proxy.put_keys)
    (request,) = run_requests_under(sensor_tick(deployment), "overlap")
    result = execute(request, deployment)
    assert result.success
    landed = chunk_materializations(result)
    # every chunk but the last is whole before the source ends: it lands during the conversion
    assert sorted(landed) == [*(("parquet_conversion", i) for i in range(3)), ("streaming", 3)]
    parts = [k for k in deployment.proxy.put_keys[mark:] if f"/{dataset}/" in k and "/part-" in k]
    assert sorted(parts) == sorted(set(parts)) and len(parts) == 4  # each chunk sent exactly once
    assert read_dataset(deployment, dataset, tmp_path) == source_rows(src, "read_csv")
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.COMPLETED and record.total_chunks == 4
    assert record.processing_stats.completed_chunks == 4 and record.processing_stats.successful_records == 170_000
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, sha256_file(src), 4)


def test_a_pass_run_again_for_a_late_wide_value_replaces_the_chunks_that_landed(
    deployment: Deployment, tmp_path
) -> None:
    """DuckDB types columns from a sample; a value past it that does not fit makes the
    conversion start again with the whole file sampled. Chunks that landed from the first
    pass had the narrow type: none of them may stay in the dataset."""
    src = numbered_csv(deployment.watch / "retyped" / "events.csv", 1_000_000, last="not-a-number,late\n")
    dataset = f"{deployment.prefix}/retyped/events.csv"
    mark = len(deployment.proxy.put_keys)
    (request,) = run_requests_under(sensor_tick(deployment), "retyped")
    result = execute(request, deployment)
    assert result.success
    expected = [(str(i), f"x{i}") for i in range(1_000_000)] + [("not-a-number", "late")]
    assert read_dataset(deployment, dataset, tmp_path) == expected  # every chunk with the wide type
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, sha256_file(src), 21)
    first_part = [k for k in deployment.proxy.put_keys[mark:] if f"/{dataset}/" in k and "/part-00000" in k]
    assert len(first_part) == 2  # it had landed from the first pass, and was sent again from the second
    record = deployment.store().get_by_path(str(src))
    assert [c.status for c in deployment.store().list_chunks(record.file_id)] == [S.COMPLETED] * 21


def test_the_manifest_is_how_a_reader_finds_the_current_version(deployment: Deployment, tmp_path) -> None:
    """docs/reading-data.md's DuckDB recipe, run: the manifest lists the current version's parts."""
    import duckdb

    src = write_csv(deployment.watch / "reader" / "promo.csv", promo_rows(60_000, seed=61))
    (request,) = run_requests_under(sensor_tick(deployment), "reader")
    assert execute(request, deployment).success
    client = deployment.s3.client()
    dataset = f"{deployment.prefix}/reader/promo.csv"
    manifest = json.loads(
        client.get_object(Bucket=deployment.s3.bucket, Key=f"{dataset}/_manifest.json")["Body"].read()
    )
    assert manifest["versionPrefix"] == f"{dataset}/v-{sha256_file(src)[:16]}/"
    local = tmp_path / "mirror"
    for part in manifest["chunks"]:
        target = local / part["key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(deployment.s3.bucket, part["key"], str(target))
    (local / dataset).mkdir(parents=True, exist_ok=True)
    (local / dataset / "_manifest.json").write_text(json.dumps(manifest))
    conn = duckdb.connect()
    conn.execute(
        "SET VARIABLE parts = (SELECT list($root || c.key ORDER BY c.chunkIndex) "
        "FROM (SELECT unnest(chunks) AS c FROM read_json($manifest)))",
        {"root": f"{local}/", "manifest": str(local / dataset / "_manifest.json")},
    )
    assert conn.sql("SELECT count(*) FROM read_parquet(getvariable('parts'))").fetchall() == [(60_000,)]


def test_the_run_queue_starts_one_run_per_file_at_a_time(tmp_path) -> None:
    import dagster as dg

    from s3proc_dagster.runs.instance import write_instance

    write_instance(tmp_path, max_concurrency=4)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:  # the dagster.yaml written above
        queue = instance.get_concurrency_config().run_queue_config
    assert queue.max_concurrent_runs == 4
    assert {
        "key": "s3proc/file_id",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    } in queue.tag_concurrency_limits
