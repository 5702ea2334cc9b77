"""One contract, two backends: every store operation against SQLite and MongoDB.

The MongoDB half runs against nx-27017 on loopback, or against MONGODB_URI when set,
and once more against nx-27017 presented as a replica set (`mongodb-replset`), where
the store writes a chunk's move and its file's counters in one transaction.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from bson import json_util
from pymongo.client_session import ClientSession

from s3proc_dagster import recovery
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


# The MongoDB servers are asked for at run time, out of sight of conftest's fixture rule.
@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("mongodb", marks=pytest.mark.servers),
        pytest.param("mongodb-replset", marks=pytest.mark.servers),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    if request.param == "sqlite":
        return "sqlite", {"path": str(tmp_path / "progress.db")}
    uri = request.getfixturevalue("mongodb_replset_uri" if request.param == "mongodb-replset" else "mongodb_uri")
    return request.param, {"uri": uri, "database": request.getfixturevalue("mongodb_database")}


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


def test_chunks_recorded_before_the_plan_is_known_are_kept_by_it_with_what_happened_to_them(
    store: ProgressStore,
) -> None:
    """A conversion lands whole chunks while it goes on (`plan_chunk`); the plan made when the
    record count is known keeps them, and the counters add up at every point."""
    status, _ = store.record_detected(new_file())
    first = store.plan_chunk(status.file_id, 0, 50, version="v2")
    second = store.plan_chunk(status.file_id, 1, 50, version="v2")
    assert (first.start_offset, first.end_offset, second.start_offset, second.end_offset) == (0, 49, 50, 99)
    store.chunk_started(first.chunk_id, "w")
    store.chunk_completed(first.chunk_id, s3_key="k0", size_bytes=1, sha256="c", duration=0.1, failed_records=3)
    assert store.plan_chunk(status.file_id, 0, 50, version="v2").status is S.COMPLETED  # never recorded twice
    assert counters(store.get(status.file_id)) == counters_of_chunk_records(store.list_chunks(status.file_id))

    chunks = store.plan_chunks(status.file_id, 120, 50, version="v2")
    assert [(c.chunk_index, c.status, c.end_offset) for c in chunks] == [
        (0, S.COMPLETED, 49),
        (1, S.PENDING, 99),
        (2, S.PENDING, 119),
    ]
    file = store.get(status.file_id)
    assert file.total_chunks == 3 and file.estimated_record_count == 120
    assert counters(file) == counters_of_chunk_records(chunks)
    assert counters(file)["records"] == (47, 3)

    assert store.plan_chunks(status.file_id, 0, 50, version="v2") == []  # a failed conversion drops its plan
    assert counters(store.get(status.file_id)) == counters_of_chunk_records([])


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
    if kind == "mongodb-replset":
        pytest.skip(
            "nx-27017 runs every transaction of a database on one shared SQLite connection: a second "
            "client's transaction nests as a savepoint and the first commit ends it ('no such savepoint'); "
            "concurrent transactions are tested against MONGODB_URI on a real replica set"
        )
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


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_store_files_are_readable_by_their_owner_only(tmp_path: Path, world_readable_umask: None) -> None:
    """They hold every file's path, S3 key and error text: 0600 from their creation,
    the -wal and -shm files too, and an older store's files once it is opened."""
    store = SQLiteProgressStore(tmp_path / "new" / "p.db")
    store.record_detected(new_file())
    assert {p.name: mode(p) for p in (tmp_path / "new").iterdir()} == dict.fromkeys(
        ("p.db", "p.db-wal", "p.db-shm"), 0o600
    )
    store.close()

    older = tmp_path / "older" / "p.db"
    older.parent.mkdir()
    conn = sqlite3.connect(older)  # as an older version left it: 0644, in WAL mode, open
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE leftover (x)")
        conn.commit()
        assert {p.name: mode(p) for p in older.parent.iterdir()} == dict.fromkeys(
            ("p.db", "p.db-wal", "p.db-shm"), 0o644
        )
        SQLiteProgressStore(older).close()
        assert {p.name: mode(p) for p in older.parent.iterdir()} == dict.fromkeys(
            ("p.db", "p.db-wal", "p.db-shm"), 0o600
        )
    finally:
        conn.close()


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


# ---- a chunk's move and its file's counters: atomic, or healed -------------------------------


def crashing_store(kind: str, params: dict) -> ProgressStore:
    """The backend's store, killed for real (SIGKILL) between a chunk's write and its file's
    counters; it prints its transaction's session id first (or `no-transaction`), so the test
    can end what the dead client left open; SQLite's is its connection's, gone with it."""
    base = SQLiteProgressStore if kind == "sqlite" else MongoProgressStore

    class DiesBetweenWrites(base):  # type: ignore[valid-type, misc]
        def _add_to_counters(self, *args: object) -> None:
            session = next((a for a in args if isinstance(a, ClientSession)), None)
            if session is not None:
                print(json_util.dumps(session.session_id), flush=True)
            else:
                print("sqlite-transaction" if kind == "sqlite" else "no-transaction", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return DiesBetweenWrites(**params)


def counters(file: FileStatus) -> dict:
    s = file.processing_stats
    return {
        "completed": s.completed_chunks,
        "in_progress": s.in_progress_chunks,
        "pending": s.pending_chunks,
        "failed": s.failed_chunks,
        "records": (s.successful_records, s.failed_records),
        "validation": {k: v for k, v in file.error_summary.get("validation", {}).items() if v},
        "processing": {k: v for k, v in file.error_summary.get("processing", {}).items() if v},
    }


def counters_of_chunk_records(chunks: list) -> dict:
    """What the chunk records say, counted here independently of the store's arithmetic."""
    done = [c for c in chunks if c.status is S.COMPLETED]
    validation: dict[str, int] = {}
    processing: dict[str, int] = {}
    for c in done:
        for rule, n in c.error_summary.get("validation", {}).items():
            validation[rule] = validation.get(rule, 0) + n
    for c in chunks:
        for kind, n in c.error_summary.get("processing", {}).items():
            processing[kind] = processing.get(kind, 0) + n
    return {
        "completed": len(done),
        "in_progress": sum(c.status is S.IN_PROGRESS for c in chunks),
        "pending": sum(c.status is S.PENDING for c in chunks),
        "failed": sum(c.status is S.FAILED for c in chunks),
        "records": (
            sum(c.processing_stats.successful_records for c in done),
            sum(c.processing_stats.failed_records for c in done),
        ),
        "validation": {k: v for k, v in validation.items() if v},
        "processing": {k: v for k, v in processing.items() if v},
    }


def is_transactional(kind: str, store: ProgressStore) -> bool:
    return kind == "sqlite" or bool(getattr(store, "transactions", False))


def end_orphaned_transaction(uri: str, session_id: str) -> None:
    """Abort the transaction a killed client left open, as a real server does on its own
    after transactionLifetimeLimitSeconds (60 s by default): `killSessions` on MongoDB.
    nx-27017 answers `killSessions` without acting, and aborts on `endSessions`."""
    from pymongo import MongoClient

    lsid = json_util.loads(session_id)
    with MongoClient(uri) as client:
        client.admin.command("killSessions", [lsid])
        client.admin.command("endSessions", [lsid])


def crash_between_the_two_writes(backend: tuple[str, dict], store: ProgressStore) -> tuple[FileStatus, dict]:
    """Chunk 0 of 3 COMPLETED (8 ok, 2 failed, two rules), chunk 1 IN_PROGRESS after one
    S3 failure, chunk 2 PENDING; then a child process completes chunk 1 (9 ok, 1 failed)
    and is SIGKILLed between the chunk's write and the file's counters.
    Returns the file as the crash left it and its counters before the crash."""
    kind, params = backend
    claimed = store.claim(new_file(), "run-dead", alive)
    file_id = claimed.record.file_id
    c0, c1, _ = store.plan_chunks(file_id, 30, 10, version="a" * 64)
    store.chunk_started(c0.chunk_id, "w0")
    store.chunk_completed(
        c0.chunk_id,
        s3_key="k0",
        size_bytes=1,
        sha256="s0",
        duration=0.1,
        failed_records=2,
        validation_errors={"invalidUserId": 1, "expiredOffer": 1},
    )
    store.chunk_started(c1.chunk_id, "w1")
    store.chunk_failed(c1.chunk_id, "connection reset", error_kind="s3UploadFailure")
    store.chunk_started(c1.chunk_id, "w1")
    before = counters(store.require(file_id))
    assert before == {
        "completed": 1,
        "in_progress": 1,
        "pending": 1,
        "failed": 0,
        "records": (8, 2),
        "validation": {"invalidUserId": 1, "expiredOffer": 1},
        "processing": {"s3UploadFailure": 1},
    }
    child = textwrap.dedent(
        f"""
        from s3proc_dagster_tests.test_stores_contract import crashing_store
        store = crashing_store({kind!r}, {params!r})
        store.chunk_completed(
            {c1.chunk_id!r}, s3_key="k1", size_bytes=1, sha256="s1", duration=0.1,
            failed_records=1, validation_errors={{"invalidUserId": 1}},
        )
        print("survived", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1]
    )
    try:
        said = proc.stdout.readline().strip()
    finally:
        proc.kill()  # a no-op once it has killed itself; the child never outlives the test
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, said
    assert (said != "no-transaction") is is_transactional(kind, store), said
    if said.startswith("{"):  # the MongoDB session of the dead client's open transaction
        end_orphaned_transaction(params["uri"], said)
    return store.require(file_id), before


def test_a_crash_between_chunk_and_counters_leaves_both_or_neither_where_there_are_transactions(
    backend: tuple[str, dict], store: ProgressStore
) -> None:
    kind, _ = backend
    after, before = crash_between_the_two_writes(backend, store)
    chunks = store.list_chunks(after.file_id)
    if is_transactional(kind, store):
        assert [c.status for c in chunks] == [S.COMPLETED, S.IN_PROGRESS, S.PENDING]  # chunk 1 rolled back
        assert chunks[1].s3_key is None and counters(after) == before
    else:  # standalone MongoDB: the chunk landed, its file's counters did not
        assert [c.status for c in chunks] == [S.COMPLETED, S.COMPLETED, S.PENDING]
        assert counters(after) == before != counters_of_chunk_records(chunks)


def test_after_a_crash_between_the_two_writes_the_next_chunk_move_makes_the_counters_exact(
    backend: tuple[str, dict], store: ProgressStore
) -> None:
    kind, _ = backend
    after, _ = crash_between_the_two_writes(backend, store)
    c2 = f"{after.file_id}-chunk-2"
    store.chunk_started(c2, "w2")
    chunks = store.list_chunks(after.file_id)
    healed = counters(store.require(after.file_id))
    assert healed == counters_of_chunk_records(chunks)
    if is_transactional(kind, store):  # chunk 1 is still to be completed
        expected = {
            "completed": 1,
            "in_progress": 2,
            "pending": 0,
            "records": (8, 2),
            "validation": {"invalidUserId": 1, "expiredOffer": 1},
        }
    else:  # chunk 1's completion, written before the crash, is now counted
        expected = {
            "completed": 2,
            "in_progress": 1,
            "pending": 0,
            "records": (17, 3),
            "validation": {"invalidUserId": 2, "expiredOffer": 1},
        }
    assert healed == {**expected, "failed": 0, "processing": {"s3UploadFailure": 1}}
    assert store.get(after.file_id).processing_stats.success_rate == round(
        expected["records"][0] / sum(expected["records"]) * 100, 2
    )


def test_after_a_crash_between_the_two_writes_recovery_makes_the_counters_exact(
    backend: tuple[str, dict], store: ProgressStore
) -> None:
    kind, _ = backend
    after, _ = crash_between_the_two_writes(backend, store)
    (settled,) = recovery.recover(store, client=None, bucket="", is_alive=alive)  # run-dead's file
    assert settled.outcome == "pending" and settled.dead_run == "run-dead"
    file = store.require(after.file_id)
    assert counters(file) == counters_of_chunk_records(store.list_chunks(after.file_id))
    completed, records = (1, (8, 2)) if is_transactional(kind, store) else (2, (17, 3))
    assert (file.processing_stats.completed_chunks, file.processing_stats.pending_chunks) == (completed, 1)
    assert (file.processing_stats.successful_records, file.processing_stats.failed_records) == records
    assert counters(store.recount(after.file_id)) == counters(file)  # a recount of exact counters changes nothing


@pytest.mark.servers  # its server is asked for at run time, out of sight of conftest's fixture rule
@pytest.mark.parametrize("kind", ["mongodb", "mongodb-replset"])
def test_mongodb_uses_a_transaction_exactly_when_the_server_has_them(
    kind: str, request: pytest.FixtureRequest, mongodb_database: str
) -> None:
    from pymongo import MongoClient, monitoring

    class Commands(monitoring.CommandListener):
        def __init__(self) -> None:
            self.seen: list[dict] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            self.seen.append({**event.command, "name": event.command_name})

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None: ...

        def failed(self, event: monitoring.CommandFailedEvent) -> None: ...

    uri = request.getfixturevalue("mongodb_replset_uri" if kind == "mongodb-replset" else "mongodb_uri")
    listener = Commands()
    client = MongoClient(uri, tz_aware=True, event_listeners=[listener])
    store = MongoProgressStore(uri, mongodb_database, client=client)
    try:
        if not os.environ.get("MONGODB_URI") or kind == "mongodb-replset":
            assert store.transactions is (kind == "mongodb-replset")  # nx-27017 itself is a standalone
        status, _ = store.record_detected(new_file())
        (chunk,) = store.plan_chunks(status.file_id, 10, 10)
        assert [c["name"] for c in listener.seen].count("hello") == 1  # asked once, when the store opened
        listener.seen.clear()
        store.chunk_started(chunk.chunk_id, "w")
        store.chunk_completed(chunk.chunk_id, s3_key="k", size_bytes=1, sha256="s", duration=0.1)
        names = [c["name"] for c in listener.seen]
        assert "hello" not in names
        target = [(c["name"], c.get(c["name"])) for c in listener.seen if c["name"] in ("update", "findAndModify")]
        if store.transactions:
            by_txn: dict[tuple, list[dict]] = {}
            for command in listener.seen:
                if "txnNumber" in command:
                    by_txn.setdefault((str(command["lsid"]), command["txnNumber"]), []).append(command)
            assert len(by_txn) == 2  # one transaction per chunk move
            for commands in by_txn.values():
                assert [(c["name"], c.get(c["name"])) for c in commands] == [
                    ("update", "ChunkStatus"),
                    ("findAndModify", "FileStatus"),  # the counters' $inc
                    ("update", "FileStatus"),  # successRate from the new counters
                    ("commitTransaction", 1),
                ]
                assert commands[0].get("startTransaction") is True
                assert all(c.get("autocommit") is False for c in commands)
            assert "abortTransaction" not in names
        else:
            assert "commitTransaction" not in names and not any("startTransaction" in c for c in listener.seen)
            assert target == [("update", "ChunkStatus"), ("update", "FileStatus")] * 2  # chunk, then its recount
        stats = store.require(status.file_id).processing_stats
        assert (stats.completed_chunks, stats.pending_chunks, stats.successful_records) == (1, 0, 10)
    finally:
        store.close()
