"""SQLite backend: the data model's `file_progress` table as written, plus tables for the rest.

The tables themselves are in `sqlite_schema.py`.

WAL mode lets readers (the sensor, `s3proc status`) run while a run writes; every write
is one `BEGIN IMMEDIATE` transaction with a busy timeout, so Dagster runs in parallel
processes queue for the write lock instead of failing with "database is locked".
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from s3proc_dagster.errors import DuplicateRecord
from s3proc_dagster.files.private import ensure_private_file, tighten
from s3proc_dagster.models import (
    ChunkStatus,
    FileStatus,
    ProcessingStatus,
    Request,
    RequestData,
    RequestStatus,
    S3UploadTask,
    utcnow,
)
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.stores.cas import ANY_HOLDER
from s3proc_dagster.stores.chunks import totals_from_chunks
from s3proc_dagster.stores.sqlite_schema import create_schema

_COUNTER_COLUMNS = (
    "completed_chunks",
    "failed_chunks",
    "in_progress_chunks",
    "pending_chunks",
    "successful_records",
    "failed_records",
)


def _insert_chunk(conn: sqlite3.Connection, chunk: ChunkStatus, conflict: str = "") -> bool:
    """One chunk row, its processing stats as the row's own columns; False if it was ignored."""
    doc = chunk.model_dump(exclude={"processing_stats"})
    doc.update(chunk.processing_stats.model_dump(exclude={"success_rate"}))
    cols = list(doc)
    cur = conn.execute(
        f"INSERT {conflict} INTO chunk_status ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        tuple(_encode(c, doc[c]) for c in cols),
    )
    return cur.rowcount == 1


def _counters(chunks: Iterable[ChunkStatus]) -> dict[str, Any]:
    """A file's counters and error summary as its chunk records add up."""
    totals = totals_from_chunks(chunks)
    summary: dict[str, dict[str, int]] = {"validation": {}, "processing": {}}
    for key, value in totals.items():
        if "." in key:
            kind, name = key.split(".", 1)
            summary.setdefault(kind, {})[name] = value
    return {**{field: totals.get(field, 0) for field in _COUNTER_COLUMNS}, "error_summary": summary}


# FileStatus fields kept in the `file_progress` table, under its own column names.
_PROGRESS_COLUMNS = {
    "file_path": "file_path",
    "status": "status",
    "file_size": "size_bytes",
    "processed_bytes": "processed_bytes",
    "checksum": "checksum",
    "output_key": "s3_key",
}
# FileStatus fields the `file_status` table names otherwise: the FileStatus document's names.
_STATUS_COLUMNS = {"source_bucket": "s3_bucket", "source_key": "s3_key"}
_STATUS_FIELDS = {column: field for field, column in _STATUS_COLUMNS.items()}
_JSON_FIELDS = {"metadata", "error_summary", "errors", "input_image_urls", "output_image_urls", "rejected"}


def _encode(field: str, value: Any) -> Any:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if field in _JSON_FIELDS:
        return None if value is None else json.dumps(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = {}
    for key in row.keys():  # noqa: SIM118 - a sqlite3.Row iterates over its values, not its keys
        value = row[key]
        out[key] = json.loads(value) if key in _JSON_FIELDS and value is not None else value
    return out


class SQLiteProgressStore(ProgressStore):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Every file's path, S3 key and error text: 0600 before SQLite opens it, so the
        # -wal and -shm files, which SQLite creates with the database's own mode, are too.
        ensure_private_file(self.path)
        for companion in ("-wal", "-shm"):
            tighten(Path(f"{self.path}{companion}"))
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout = 60000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        with self._write() as conn:
            create_schema(conn)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            deadline = time.monotonic() + 120
            while True:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:  # busy beyond busy_timeout
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- files ---------------------------------------------------------------------------

    _FILE_SELECT = """
        SELECT fs.*, fp.file_path, fp.status, fp.size_bytes AS file_size, fp.processed_bytes,
               fp.checksum, fp.s3_key AS output_key, fp.id AS progress_id
        FROM file_status fs JOIN file_progress fp ON fp.id = fs.progress_id
    """

    @staticmethod
    def _to_file(row: sqlite3.Row) -> FileStatus:
        data = {_STATUS_FIELDS.get(k, k): v for k, v in _decode(row).items()}
        data["processing_stats"] = {k: data.pop(k) for k in _COUNTER_COLUMNS}
        data.pop("progress_id", None)
        return FileStatus.model_validate(data)

    def _insert_file(self, status: FileStatus) -> bool:
        now = int(time.time())
        try:
            with self._write() as conn:
                cur = conn.execute(
                    "INSERT INTO file_progress (file_path, status, size_bytes, processed_bytes, checksum, s3_key,"
                    " error_message, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        status.file_path,
                        status.status.value,
                        status.file_size,
                        status.processed_bytes,
                        status.checksum,
                        status.output_key,
                        status.error_details,
                        now,
                        now,
                    ),
                )
                fields = status.model_dump(exclude={"processing_stats", *_PROGRESS_COLUMNS})
                doc = {_STATUS_COLUMNS.get(k, k): v for k, v in fields.items()}
                doc["progress_id"] = cur.lastrowid
                cols = list(doc)
                conn.execute(
                    f"INSERT INTO file_status ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    tuple(_encode(c, doc[c]) for c in cols),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def _load_file(self, *, file_id: str | None = None, path: str | None = None) -> FileStatus | None:
        if file_id is not None:
            rows = self._query(self._FILE_SELECT + " WHERE fs.file_id = ?", (file_id,))
        else:
            rows = self._query(self._FILE_SELECT + " WHERE fp.file_path = ?", (path,))
        return self._to_file(rows[0]) if rows else None

    def _list_files(self, status: ProcessingStatus | None) -> list[FileStatus]:
        if status is None:
            rows = self._query(self._FILE_SELECT + " ORDER BY fp.id")
        else:
            rows = self._query(self._FILE_SELECT + " WHERE fp.status = ? ORDER BY fp.id", (status.value,))
        return [self._to_file(r) for r in rows]

    def _set_file(self, conn: sqlite3.Connection, file_id: str, fields: dict[str, Any]) -> None:
        """Write FileStatus fields to whichever table holds them; both `updated_at`s move."""
        progress = {_PROGRESS_COLUMNS[k]: v for k, v in fields.items() if k in _PROGRESS_COLUMNS}
        if "error_details" in fields:
            progress["error_message"] = fields["error_details"]
        status_cols = {_STATUS_COLUMNS.get(k, k): v for k, v in fields.items() if k not in _PROGRESS_COLUMNS}
        status_cols["last_updated_at"] = utcnow()
        progress["updated_at"] = int(time.time())
        conn.execute(
            f"UPDATE file_progress SET {', '.join(f'{c} = ?' for c in progress)}"
            " WHERE id = (SELECT progress_id FROM file_status WHERE file_id = ?)",
            (*(_encode(c, v) for c, v in progress.items()), file_id),
        )
        conn.execute(
            f"UPDATE file_status SET {', '.join(f'{c} = ?' for c in status_cols)} WHERE file_id = ?",
            (*(_encode(c, v) for c, v in status_cols.items()), file_id),
        )

    def _cas_file(
        self, file_id: str, expected: ProcessingStatus, fields: dict[str, Any], expected_run_id: Any = ANY_HOLDER
    ) -> bool:
        with self._write() as conn:
            row = conn.execute(
                "SELECT fp.status, fs.run_id FROM file_status fs JOIN file_progress fp ON fp.id = fs.progress_id"
                " WHERE fs.file_id = ?",
                (file_id,),
            ).fetchone()
            if row is None or row["status"] != expected.value:
                return False
            if expected_run_id is not ANY_HOLDER and row["run_id"] != expected_run_id:
                return False
            self._set_file(conn, file_id, fields)
            return True

    # ---- chunks --------------------------------------------------------------------------

    @staticmethod
    def _to_chunk(row: sqlite3.Row) -> ChunkStatus:
        data = _decode(row)
        data["processing_stats"] = {
            "successful_records": data.pop("successful_records"),
            "failed_records": data.pop("failed_records"),
        }
        return ChunkStatus.model_validate(data)

    def _replace_chunks(self, file_id: str, chunks: list[ChunkStatus], file_fields: dict[str, Any]) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM chunk_status WHERE file_id = ?", (file_id,))
            for chunk in chunks:
                _insert_chunk(conn, chunk)
            self._set_file(conn, file_id, {**file_fields, **_counters(chunks)})

    def _add_chunk(self, chunk: ChunkStatus, file_delta: dict[str, int]) -> bool:
        with self._write() as conn:
            if not _insert_chunk(conn, chunk, "OR IGNORE"):
                return False
            self._add_to_counters(conn, chunk.file_id, file_delta)
            return True

    def _load_chunks(self, file_id: str) -> list[ChunkStatus]:
        rows = self._query("SELECT * FROM chunk_status WHERE file_id = ? ORDER BY chunk_index", (file_id,))
        return [self._to_chunk(r) for r in rows]

    def list_all_chunks(self) -> list[ChunkStatus]:
        return [self._to_chunk(r) for r in self._query("SELECT * FROM chunk_status ORDER BY file_id, chunk_index")]

    def _load_chunk(self, chunk_id: str) -> ChunkStatus | None:
        rows = self._query("SELECT * FROM chunk_status WHERE chunk_id = ?", (chunk_id,))
        return self._to_chunk(rows[0]) if rows else None

    def _cas_chunk(
        self,
        chunk: ChunkStatus,
        expected: ProcessingStatus,
        expected_retry: int,
        fields: dict[str, Any],
        file_delta: dict[str, int],
    ) -> bool:
        values = dict(fields)
        stats = values.pop("processing_stats", None)
        if stats:
            values.update(stats)
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE chunk_status SET {', '.join(f'{c} = ?' for c in values)}"
                " WHERE chunk_id = ? AND status = ? AND retry_count = ?",
                (*(_encode(c, v) for c, v in values.items()), chunk.chunk_id, expected.value, expected_retry),
            )
            if cur.rowcount != 1:
                return False
            self._add_to_counters(conn, chunk.file_id, file_delta)
            return True

    def _add_to_counters(self, conn: sqlite3.Connection, file_id: str, delta: dict[str, int]) -> None:
        """The second write of a chunk's move, in the same transaction as the first."""
        counters = {k: v for k, v in delta.items() if "." not in k}
        summary_delta = {k: v for k, v in delta.items() if "." in k}
        sets = [f"{c} = {c} + ?" for c in counters] + ["last_updated_at = ?"]
        params: list[Any] = [*counters.values(), utcnow().isoformat()]
        if summary_delta:
            (raw,) = conn.execute("SELECT error_summary FROM file_status WHERE file_id = ?", (file_id,)).fetchone()
            summary = json.loads(raw)
            for key, inc in summary_delta.items():
                kind, name = key.split(".", 1)
                bucket = summary.setdefault(kind, {})
                bucket[name] = bucket.get(name, 0) + inc
                if not bucket[name]:
                    del bucket[name]
            sets.append("error_summary = ?")
            params.append(json.dumps(summary))
        conn.execute(f"UPDATE file_status SET {', '.join(sets)} WHERE file_id = ?", (*params, file_id))
        conn.execute(
            "UPDATE file_progress SET updated_at = ? WHERE id = (SELECT progress_id FROM file_status WHERE file_id = ?)",
            (int(time.time()), file_id),
        )

    def _recount(self, file_id: str) -> None:
        """One transaction, like every chunk move here: the counters never drift, so this
        only confirms them (kept for the contract: both backends answer `recount`)."""
        with self._write() as conn:
            rows = conn.execute("SELECT * FROM chunk_status WHERE file_id = ?", (file_id,)).fetchall()
            self._set_file(conn, file_id, _counters(self._to_chunk(r) for r in rows))

    # ---- image requests ----------------------------------------------------------------------

    def _insert_request(self, request: Request, rows: list[RequestData]) -> None:
        try:
            with self._write() as conn:
                doc = request.model_dump()
                conn.execute(
                    f"INSERT INTO requests ({', '.join(doc)}) VALUES ({', '.join('?' * len(doc))})",
                    tuple(_encode(c, v) for c, v in doc.items()),
                )
                for row in rows:
                    rdoc = row.model_dump()
                    conn.execute(
                        f"INSERT INTO request_data ({', '.join(rdoc)}) VALUES ({', '.join('?' * len(rdoc))})",
                        tuple(_encode(c, v) for c, v in rdoc.items()),
                    )
        except sqlite3.IntegrityError as exc:
            raise DuplicateRecord(f"request {request.request_id}: already recorded ({exc})") from None

    def get_request(self, request_id: str) -> Request | None:
        rows = self._query("SELECT * FROM requests WHERE request_id = ?", (request_id,))
        return Request.model_validate(_decode(rows[0])) if rows else None

    def list_requests(self) -> list[Request]:
        return [Request.model_validate(_decode(r)) for r in self._query("SELECT * FROM requests ORDER BY created_at")]

    def list_request_rows(self, request_id: str) -> list[RequestData]:
        rows = self._query("SELECT * FROM request_data WHERE request_id = ? ORDER BY serial_number", (request_id,))
        return [RequestData.model_validate(_decode(r)) for r in rows]

    def _cas_request(self, request_id: str, expected: RequestStatus, fields: dict[str, Any]) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE requests SET {', '.join(f'{c} = ?' for c in fields)} WHERE request_id = ? AND status = ?",
                (*(_encode(c, v) for c, v in fields.items()), request_id, expected.value),
            )
            return cur.rowcount == 1

    def _update_row(self, request_id: str, serial_number: int, fields: dict[str, Any]) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE request_data SET {', '.join(f'{c} = ?' for c in fields)}"
                " WHERE request_id = ? AND serial_number = ?",
                (*(_encode(c, v) for c, v in fields.items()), request_id, serial_number),
            )
            return cur.rowcount == 1

    # ---- multipart uploads (S3UploadTask) -------------------------------------------------

    def save_upload_task(self, task: S3UploadTask) -> None:
        doc = task.model_dump()
        doc["updated_at"] = utcnow()
        with self._write() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO upload_tasks ({', '.join(doc)}) VALUES ({', '.join('?' * len(doc))})",
                tuple(_encode(c, v) for c, v in doc.items()),
            )

    def find_upload_task(self, bucket: str, s3_key: str, checksum: str) -> S3UploadTask | None:
        rows = self._query(
            "SELECT * FROM upload_tasks WHERE bucket = ? AND s3_key = ? AND checksum = ?", (bucket, s3_key, checksum)
        )
        return S3UploadTask.model_validate(_decode(rows[0])) if rows else None

    def list_upload_tasks(self, file_id: str | None = None) -> list[S3UploadTask]:
        if file_id is None:
            rows = self._query("SELECT * FROM upload_tasks ORDER BY created_at")
        else:
            rows = self._query("SELECT * FROM upload_tasks WHERE file_id = ? ORDER BY created_at", (file_id,))
        return [S3UploadTask.model_validate(_decode(r)) for r in rows]

    def delete_upload_task(self, task_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM upload_tasks WHERE id = ?", (task_id,))
