"""One contract, two backends: every store operation against SQLite and MongoDB.

The MongoDB half runs against nx-27017 on loopback, or against MONGODB_URI when set.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from s3proc_dagster.errors import FileBusy, IllegalTransition, RecordNotFound, VersionSuperseded
from s3proc_dagster.models import (
    FileStatus,
    Request,
    RequestData,
    RequestStatus,
    S3UploadTask,
    UploadStatus,
    make_file_id,
    utcnow,
)
from s3proc_dagster.models import (
    ProcessingStatus as S,
)
from s3proc_dagster.stores.base import ClaimOutcome, ProgressStore
from s3proc_dagster.stores.mongo import MongoProgressStore
from s3proc_dagster.stores.sqlite import SQLiteProgressStore


@pytest.fixture(params=["sqlite", "mongodb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    if request.param == "sqlite":
        return "sqlite", {"path": str(tmp_path / "progress.db")}
    uri = request.getfixturevalue("mongodb_uri")
    return "mongodb", {"uri": uri, "database": request.getfixturevalue("mongodb_database")}


def open_backend(kind: str, params: dict) -> ProgressStore:
    if kind == "sqlite":
        return SQLiteProgressStore(params["path"])
    return MongoProgressStore(params["uri"], params["database"])


@pytest.fixture
def store(backend: tuple[str, dict]) -> ProgressStore:
    opened = open_backend(*backend)
    yield opened
    opened.close()


def new_file(rel: str = "in/promo_batch_123.csv", checksum: str = "a" * 64, size: int = 100) -> FileStatus:
    return FileStatus(
        file_id=make_file_id(rel),
        file_path=f"/data/{rel}",
        file_name=Path(rel).name,
        checksum=checksum,
        file_size=size,
        metadata={"source": "campaign-manager", "campaignId": "spring-promo-2024"},
    )


def test_detected_file_is_pending_and_found_by_path_and_id(store: ProgressStore) -> None:
    status, needed = store.record_detected(new_file())
    assert needed and status.status is S.PENDING
    assert store.get_by_path("/data/in/promo_batch_123.csv").file_id == status.file_id
    assert store.get(status.file_id).metadata["campaignId"] == "spring-promo-2024"
    assert [f.file_id for f in store.list_files(S.PENDING)] == [status.file_id]
    assert store.list_files(S.COMPLETED) == []


def test_lifecycle_pending_in_progress_completed_sets_timestamps(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    started = store.start(status.file_id)
    assert started.status is S.IN_PROGRESS and started.processing_started_at is not None
    done = store.complete(status.file_id, "prefix/in/promo_batch_123.csv", processed_bytes=100)
    assert done.status is S.COMPLETED and done.output_key == "prefix/in/promo_batch_123.csv"
    assert done.completed_at is not None and done.last_updated_at >= started.last_updated_at


@pytest.mark.parametrize(
    "path_to, illegal",
    [
        ([], S.COMPLETED),  # PENDING -> COMPLETED skips IN_PROGRESS
        ([], S.FAILED),  # PENDING -> FAILED
        (["start", "complete"], S.IN_PROGRESS),  # COMPLETED -> IN_PROGRESS
        (["start", "fail"], S.COMPLETED),  # FAILED -> COMPLETED
        (["start", "fail"], S.IN_PROGRESS),  # FAILED -> IN_PROGRESS without manual retry
    ],
)
def test_illegal_transitions_are_rejected_with_a_clear_error(
    store: ProgressStore, path_to: list[str], illegal: S
) -> None:
    status, _ = store.record_detected(new_file())
    for step in path_to:
        if step == "start":
            store.start(status.file_id)
        elif step == "complete":
            store.complete(status.file_id, "k")
        else:
            store.fail(status.file_id, "boom")
    before = store.get(status.file_id).status
    with pytest.raises(IllegalTransition, match=f"cannot go from {before.name} to {illegal.name}"):
        if illegal is S.COMPLETED:
            store.complete(status.file_id, "k")
        elif illegal is S.FAILED:
            store.fail(status.file_id, "x")
        else:
            store.start(status.file_id)
    assert store.get(status.file_id).status is before


def test_completed_requires_an_s3_key(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    store.start(status.file_id)
    with pytest.raises(IllegalTransition, match="requires an s3Key"):
        store.complete(status.file_id, "")
    assert store.get(status.file_id).status is S.IN_PROGRESS


def test_failed_file_goes_back_to_pending_on_manual_retry(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    store.start(status.file_id)
    failed = store.fail(status.file_id, "S3 unreachable")
    assert failed.error_details == "S3 unreachable"
    retried = store.reset_to_pending(status.file_id)
    assert retried.status is S.PENDING and retried.error_details is None


def test_unchanged_completed_file_is_skipped_and_changed_one_reprocessed(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    store.start(status.file_id)
    store.complete(status.file_id, "k")
    same, needed = store.record_detected(new_file())
    assert not needed and same.status is S.COMPLETED
    changed, needed = store.record_detected(new_file(checksum="b" * 64, size=200))
    assert needed and changed.status is S.PENDING
    assert changed.checksum == "b" * 64 and changed.file_size == 200


def test_updated_at_changes_on_every_write(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    stamps = [store.get(status.file_id).last_updated_at]
    for action in (
        lambda: store.start(status.file_id),
        lambda: store.update_file(status.file_id, content_type="text/csv"),
    ):
        wait_past_millisecond(stamps[-1])  # BSON dates keep milliseconds
        action()
        stamps.append(store.get(status.file_id).last_updated_at)
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


def wait_past_millisecond(stamp: datetime) -> None:
    deadline = time.monotonic() + 5
    while utcnow() <= stamp + timedelta(milliseconds=1):
        assert time.monotonic() < deadline


def test_unknown_ids_raise_record_not_found(store: ProgressStore) -> None:
    with pytest.raises(RecordNotFound):
        store.start("nope")
    with pytest.raises(RecordNotFound):
        store.chunk_started("nope-chunk-0", "t")
    assert store.get("nope") is None and store.get_by_path("/nope") is None


def test_chunk_plan_has_exact_fixed_count_offsets(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    chunks = store.plan_chunks(status.file_id, record_count=120_001, chunk_size=50_000)
    assert [(c.chunk_index, c.start_offset, c.end_offset, c.record_count) for c in chunks] == [
        (0, 0, 49_999, 50_000),
        (1, 50_000, 99_999, 50_000),
        (2, 100_000, 120_000, 20_001),
    ]
    assert chunks[1].chunk_id == f"{status.file_id}-chunk-1"
    file = store.get(status.file_id)
    assert file.total_chunks == 3 and file.chunk_size == 50_000 and file.estimated_record_count == 120_001
    assert file.processing_stats.pending_chunks == 3


def test_replanning_the_same_plan_keeps_finished_chunks(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    chunks = store.plan_chunks(status.file_id, 10, 5)
    store.chunk_started(chunks[0].chunk_id, "w-1")
    store.chunk_completed(chunks[0].chunk_id, s3_key="k0", size_bytes=1, sha256="c", duration=0.1)
    again = store.plan_chunks(status.file_id, 10, 5)
    assert [c.status for c in again] == [S.COMPLETED, S.PENDING]


def test_chunk_lifecycle_keeps_file_stats_equal_to_chunk_records(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    chunks = store.plan_chunks(status.file_id, 200, 50)
    store.chunk_started(chunks[0].chunk_id, "worker-1")
    done = store.chunk_completed(
        chunks[0].chunk_id,
        s3_key="p/part-00000.parquet",
        size_bytes=123,
        sha256="d" * 64,
        duration=1.5,
        failed_records=2,
        validation_errors={"invalidUserId": 1, "expiredOffer": 2},
    )
    assert done.processing_stats.successful_records == 48 and done.processing_stats.success_rate == 96.0
    assert done.processing_thread == "worker-1" and done.duration == 1.5
    store.chunk_started(chunks[1].chunk_id, "worker-2")
    failed = store.chunk_failed(chunks[1].chunk_id, "upload: connection reset", error_kind="s3UploadFailure")
    assert failed.error_summary["processing"] == {"s3UploadFailure": 1}
    retried = store.chunk_started(chunks[1].chunk_id, "worker-2")
    assert retried.retry_count == 1
    store.chunk_started(chunks[2].chunk_id, "worker-3")

    file = store.get(status.file_id)
    records = store.list_chunks(status.file_id)
    stats = file.processing_stats
    assert stats.completed_chunks == sum(c.status is S.COMPLETED for c in records) == 1
    assert stats.in_progress_chunks == sum(c.status is S.IN_PROGRESS for c in records) == 2
    assert stats.pending_chunks == sum(c.status is S.PENDING for c in records) == 1
    assert stats.failed_chunks == 0
    assert (stats.successful_records, stats.failed_records) == (48, 2)
    assert file.error_summary["validation"] == {"invalidUserId": 1, "expiredOffer": 2}
    assert file.error_summary["processing"] == {"s3UploadFailure": 1}


def test_completing_a_chunk_twice_counts_its_records_once(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    (chunk,) = store.plan_chunks(status.file_id, 10, 10)
    store.chunk_started(chunk.chunk_id, "w")
    for _ in range(2):
        store.chunk_completed(chunk.chunk_id, s3_key="k", size_bytes=1, sha256="e", duration=0.1)
    stats = store.get(status.file_id).processing_stats
    assert (stats.completed_chunks, stats.successful_records) == (1, 10)


def test_image_request_rows_track_outputs_in_input_order(store: ProgressStore) -> None:
    rows = [
        RequestData(
            request_id="r1",
            serial_number=n,
            product_name=f"P{n}",
            input_image_urls=[f"http://x/{n}a", f"http://x/{n}b"],
        )
        for n in (1, 2)
    ]
    created = store.create_request(Request(request_id="r1", file_name="products.csv"), rows)
    assert created.status is RequestStatus.PENDING
    store.set_request_status("r1", RequestStatus.PROCESSING)
    store.set_row_outputs("r1", 1, ["s3://b/1/1.jpg", None], [None, "404"], completed=False)
    store.set_row_outputs("r1", 1, ["s3://b/1/1.jpg", "s3://b/1/2.jpg"], [None, None], completed=True)
    done = store.set_request_status("r1", RequestStatus.COMPLETED, output_csv_url="s3://b/out.csv")
    assert done.output_csv_url == "s3://b/out.csv"
    got = store.list_request_rows("r1")
    assert [r.serial_number for r in got] == [1, 2]
    assert got[0].output_image_urls == ["s3://b/1/1.jpg", "s3://b/1/2.jpg"] and got[0].completed_at is not None
    assert got[1].completed_at is None and got[1].input_image_urls == ["http://x/2a", "http://x/2b"]
    with pytest.raises(IllegalTransition):
        store.set_request_status("r1", RequestStatus.PROCESSING)
    with pytest.raises(IllegalTransition):
        store.create_request(Request(request_id="r1"), [])


def _hammer(kind: str, params: dict, chunk_ids: list[str], worker: int) -> None:
    opened = open_backend(kind, params)
    for cid in chunk_ids:
        opened.chunk_started(cid, f"worker-{worker}")
        opened.chunk_completed(cid, s3_key=f"k/{cid}", size_bytes=1, sha256="f", duration=0.01)
    opened.close()


def test_four_processes_of_concurrent_chunk_updates_lose_nothing(
    backend: tuple[str, dict], store: ProgressStore
) -> None:
    kind, params = backend
    per_worker = 250 if kind == "sqlite" else 60  # nx-27017 is slow; a real MongoDB takes the full load
    if kind == "mongodb" and os.environ.get("MONGODB_URI"):
        per_worker = 250
    status, _ = store.record_detected(new_file())
    chunks = store.plan_chunks(status.file_id, 4 * per_worker, 1)
    ids = [c.chunk_id for c in chunks]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(kind, params, ids[w::4], w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    records = store.list_chunks(status.file_id)
    stats = store.get(status.file_id).processing_stats
    assert all(c.status is S.COMPLETED for c in records)
    assert stats.completed_chunks == len(records) == 4 * per_worker
    assert (stats.pending_chunks, stats.in_progress_chunks, stats.successful_records) == (0, 0, 4 * per_worker)


def test_store_reopened_after_kill_holds_every_committed_record(backend: tuple[str, dict]) -> None:
    kind, params = backend
    script = textwrap.dedent(
        f"""
        import sys, time
        from s3proc_dagster_tests.test_stores_contract import open_backend, new_file
        store = open_backend({kind!r}, {params!r})
        for i in range(20):
            status, _ = store.record_detected(new_file(f"kill/{{i}}.csv"))
            store.start(status.file_id)
        print("committed", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    try:
        assert proc.stdout.readline().strip() == "committed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    reopened = open_backend(kind, params)
    assert len(reopened.list_files(S.IN_PROGRESS)) == 20
    reopened.close()


def test_sqlite_schema_is_the_seeds_file_progress_table(tmp_path: Path) -> None:
    SQLiteProgressStore(tmp_path / "p.db").close()
    conn = sqlite3.connect(tmp_path / "p.db")
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'file_progress'").fetchone()[0]
    assert "file_path TEXT UNIQUE NOT NULL" in sql
    assert "CHECK(status IN ('pending', 'in_progress', 'completed', 'failed'))" in sql
    indexes = {
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='file_progress' AND sql IS NOT NULL"
        )
    }
    assert indexes == {"idx_file_path", "idx_status", "idx_updated_at"}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO file_progress (file_path, status, created_at, updated_at) VALUES ('x', 'bogus', 1, 1)"
        )


def test_mongodb_documents_use_the_seeds_field_names(mongodb_uri: str, mongodb_database: str) -> None:
    store = MongoProgressStore(mongodb_uri, mongodb_database)
    status, _ = store.record_detected(new_file())
    store.start(status.file_id)
    store.plan_chunks(status.file_id, 10, 5)
    doc = store.files.find_one({"fileId": status.file_id})
    assert doc["status"] == "IN_PROGRESS" and doc["fileName"] == "promo_batch_123.csv"
    assert set(doc["processingStats"]) >= {
        "completedChunks",
        "failedChunks",
        "inProgressChunks",
        "pendingChunks",
        "successRate",
    }
    chunk = store.chunks.find_one({"chunkId": f"{status.file_id}-chunk-1"})
    assert (chunk["chunkIndex"], chunk["startOffset"], chunk["endOffset"], chunk["recordCount"]) == (1, 5, 9, 5)
    indexes = {tuple(k for k, _ in ix["key"].items()): ix.get("unique", False) for ix in store.chunks.list_indexes()}
    assert indexes[("chunkId",)] is True
    store.close()


# ---- claims: one live run per file -------------------------------------------------------------

ALIVE = {"run-a", "run-b"}


def alive(run_id: str) -> bool:
    return run_id in ALIVE


def test_first_claim_wins_and_a_second_live_run_is_told_who_holds_the_file(store: ProgressStore) -> None:
    first = store.claim(new_file(), "run-a", alive)
    assert first.outcome is ClaimOutcome.CLAIMED and first.record.status is S.IN_PROGRESS
    assert first.record.run_id == "run-a" and first.record.processing_started_at is not None
    second = store.claim(new_file(), "run-b", alive)
    assert second.outcome is ClaimOutcome.BUSY and second.holder == "run-a"
    with pytest.raises(FileBusy, match="run run-a is processing"):
        store.hold(first.record.file_id, "run-b", alive, "a" * 64)
    assert store.hold(first.record.file_id, "run-a", alive, "a" * 64).run_id == "run-a"


def test_a_dead_holder_is_taken_over_and_cannot_write_any_more(store: ProgressStore) -> None:
    claimed = store.claim(new_file(), "run-dead", alive)
    taken = store.claim(new_file(), "run-b", alive)
    assert taken.outcome is ClaimOutcome.CLAIMED and taken.record.run_id == "run-b"
    with pytest.raises(FileBusy):
        store.fail(claimed.record.file_id, "late failure of a dead run", run_id="run-dead")
    with pytest.raises(FileBusy):
        store.reset_to_pending(claimed.record.file_id, "recovery of the dead run", run_id="run-dead")
    assert store.complete(claimed.record.file_id, "k", run_id="run-b").status is S.COMPLETED


def test_a_completed_version_is_unchanged_and_a_new_one_is_claimed(store: ProgressStore) -> None:
    claimed = store.claim(new_file(), "run-a", alive)
    store.complete(claimed.record.file_id, "k", run_id="run-a")
    assert store.claim(new_file(), "run-b", alive).outcome is ClaimOutcome.UNCHANGED
    changed = store.claim(new_file(checksum="b" * 64, size=7), "run-b", alive)
    assert changed.outcome is ClaimOutcome.CLAIMED and changed.record.checksum == "b" * 64
    assert changed.record.file_size == 7 and changed.record.run_id == "run-b"
    with pytest.raises(VersionSuperseded):
        store.hold(claimed.record.file_id, "run-a", alive, "a" * 64)  # run-a's version is gone


def test_a_failed_file_is_held_again_by_its_reexecution(store: ProgressStore) -> None:
    claimed = store.claim(new_file(), "run-dead", alive)
    store.fail(claimed.record.file_id, "boom", run_id="run-dead")
    again = store.hold(claimed.record.file_id, "run-a", alive, "a" * 64)
    assert again.status is S.IN_PROGRESS and again.run_id == "run-a" and again.error_details is None


def test_a_new_version_never_inherits_the_old_versions_chunks(store: ProgressStore) -> None:
    status, _ = store.record_detected(new_file())
    old = store.plan_chunks(status.file_id, 10, 5, version="a" * 64)
    store.chunk_started(old[0].chunk_id, "w")
    store.chunk_completed(old[0].chunk_id, s3_key="k0", size_bytes=1, sha256="c", duration=0.1)
    assert store.plan_chunks(status.file_id, 10, 5, version="a" * 64)[0].status is S.COMPLETED
    new = store.plan_chunks(status.file_id, 10, 5, version="b" * 64)  # same offsets, other bytes
    assert [(c.status, c.version) for c in new] == [(S.PENDING, "b" * 64)] * 2
    assert store.get(status.file_id).processing_stats.completed_chunks == 0


def test_upload_tasks_are_found_by_key_and_content(store: ProgressStore) -> None:
    task = S3UploadTask(
        id="t1",
        source_file_path="/s/x",
        s3_key="p/x",
        bucket="b",
        upload_id="u1",
        checksum="c" * 64,
        status=UploadStatus.UPLOADING,
        file_id="f1",
        size=10,
    )
    store.save_upload_task(task)
    store.save_upload_task(task.model_copy(update={"uploaded_bytes": 8}))
    found = store.find_upload_task("b", "p/x", "c" * 64)
    assert found is not None and found.upload_id == "u1" and found.uploaded_bytes == 8
    assert store.find_upload_task("b", "p/x", "d" * 64) is None  # other bytes: not this upload
    assert [t.id for t in store.list_upload_tasks("f1")] == ["t1"] and store.list_upload_tasks("f2") == []
    store.delete_upload_task("t1")
    assert store.list_upload_tasks() == []
