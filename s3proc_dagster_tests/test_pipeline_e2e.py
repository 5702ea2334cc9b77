"""End to end through the sensor and real runs, on SeaweedFS and SQLite."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.support import Deployment, csv_bytes, promo_rows, write_csv
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster_tests.pipeline_helpers import (
    execute,
    read_dataset,
    run_requests_under,
    sensor_tick,
    source_rows,
    write_gz,
    write_tar_gz,
    write_zip,
)


def test_every_file_type_lands_in_s3_equal_to_its_source(deployment: Deployment, tmp_path: Path) -> None:
    w = deployment.watch / "types"
    big = write_csv(w / "promo_big.csv", promo_rows(120_001))
    tsv = write_csv(w / "sheet.tsv", promo_rows(50, seed=2), delimiter="\t")
    (w / "array.json").write_text(json.dumps([{"id": i, "name": f"n{i}"} for i in range(30)]))
    (w / "lines.jsonl").write_text("\n".join(json.dumps({"id": i, "v": i * 1.5}) for i in range(40)) + "\n")
    (w / "records.xml").write_text(
        "<?xml version='1.0'?><rows>"
        + "".join(f"<row><id>{i}</id><name>x{i}</name></row>" for i in range(25))
        + "</rows>"
    )
    small = promo_rows(10, seed=3)
    write_zip(w / "bundle.zip", {"top.csv": csv_bytes(small), "nested/deeper/inner.csv": csv_bytes(small[:4])})
    write_tar_gz(w / "bundle.tar.gz", {"a/b.csv": csv_bytes(small[:6])})
    write_gz(w / "single.csv.gz", csv_bytes(small[:7]))
    blob = bytes(range(256)) * 4000
    (w / "image.bin").write_bytes(blob)

    requests = run_requests_under(sensor_tick(deployment), "types")
    assert len(requests) == 9
    assert run_requests_under(sensor_tick(deployment), "types") == []  # exactly once
    for request in requests:
        result = execute(request, deployment)
        assert result.success, request.tags["s3proc/path"]

    p = f"{deployment.prefix}/types"
    assert read_dataset(deployment, f"{p}/promo_big.csv", tmp_path) == source_rows(big, "read_csv")
    assert read_dataset(deployment, f"{p}/sheet.tsv", tmp_path) == source_rows(tsv, "read_csv")
    assert len(read_dataset(deployment, f"{p}/array.json", tmp_path)) == 30
    assert read_dataset(deployment, f"{p}/lines.jsonl", tmp_path)[39] == (39, 58.5)
    assert len(read_dataset(deployment, f"{p}/records.xml", tmp_path)) == 25
    assert len(read_dataset(deployment, f"{p}/bundle.zip/top.csv", tmp_path)) == 10
    assert len(read_dataset(deployment, f"{p}/bundle.zip/nested/deeper/inner.csv", tmp_path)) == 4
    assert len(read_dataset(deployment, f"{p}/bundle.tar.gz/a/b.csv", tmp_path)) == 6
    assert len(read_dataset(deployment, f"{p}/single.csv.gz/single.csv", tmp_path)) == 7

    client = deployment.s3.client()
    got = client.get_object(Bucket=deployment.s3.bucket, Key=f"{p}/image.bin")
    assert got["Body"].read() == blob and got["Metadata"]["x-completed"] == "true"
    manifest = client.get_object(Bucket=deployment.s3.bucket, Key=f"{p}/promo_big.csv/_manifest.json")
    assert manifest["Metadata"]["x-completed"] == "true"
    assert json.loads(manifest["Body"].read())["totalRows"] == 120_001

    store = deployment.store()
    record = store.get_by_path(str(big))
    assert record.status is S.COMPLETED and record.output_key == f"{p}/promo_big.csv"
    chunks = store.list_chunks(record.file_id)
    assert [(c.start_offset, c.end_offset, c.record_count) for c in chunks] == [
        (0, 49_999, 50_000),
        (50_000, 99_999, 50_000),
        (100_000, 120_000, 20_001),
    ]
    assert all(c.status is S.COMPLETED and c.sha256 for c in chunks)
    assert record.processing_stats.completed_chunks == 3
    for path in (tsv, w / "bundle.zip", w / "image.bin"):
        assert store.get_by_path(str(path)).status is S.COMPLETED
    entry = store.get_by_path(f"{w / 'bundle.zip'}!/nested/deeper/inner.csv")  # each entry is tracked too
    assert entry.status is S.COMPLETED and entry.output_key == f"{p}/bundle.zip/nested/deeper/inner.csv"
    assert entry.metadata["archiveFileId"] == store.get_by_path(str(w / "bundle.zip")).file_id


def test_unchanged_file_is_skipped_and_changed_file_reprocessed(deployment: Deployment, tmp_path: Path) -> None:
    w = deployment.watch / "again"
    f = write_csv(w / "p.csv", promo_rows(5))
    (request,) = run_requests_under(sensor_tick(deployment), "again")
    assert execute(request, deployment).success
    store = deployment.store()
    first = store.get_by_path(str(f))
    # the same content re-run (e.g. a re-executed run): recorded as skipped, nothing uploaded
    again = execute(request, deployment)
    assert again.success
    assert not any(e.step_key == "streaming" for e in again.get_step_success_events())
    assert store.get_by_path(str(f)).completed_at == first.completed_at
    write_csv(f, promo_rows(8, seed=9))
    (changed,) = run_requests_under(sensor_tick(deployment), "again")
    assert changed.run_key != request.run_key
    assert execute(changed, deployment).success
    assert len(read_dataset(deployment, f"{deployment.prefix}/again/p.csv", tmp_path)) == 8


def test_a_column_of_numbers_with_na_says_in_the_files_materialization_how_to_read_it_as_numbers(
    deployment: Deployment,
) -> None:
    src = deployment.watch / "na-hint" / "flights.csv"
    src.parent.mkdir()
    src.write_text("id,dep_delay\n" + "".join(f"{i},{'NA' if i % 20 == 0 else i}\n" for i in range(100)))
    (request,) = run_requests_under(sensor_tick(deployment), "na-hint")
    result = execute(request, deployment)
    assert result.success
    (completed,) = [
        m for m in result.asset_materializations_for_node("progress_update") if m.tags.get("s3proc/kind") == "file"
    ]
    hint = completed.metadata["text_columns_of_numbers"].value
    assert "dep_delay" in hint and "'NA'" in hint and "CSV_NULL_STRINGS=NA," in hint
    # and the specification's word for a CSV says what it means where the user reads it
    assert completed.metadata["file_type"].value == "database (tabular, converted to Parquet chunks)"
