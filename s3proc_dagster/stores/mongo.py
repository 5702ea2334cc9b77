"""MongoDB backend: collections `FileStatus`, `ChunkStatus`, `Requests`, `RequestData`.

Documents use the specification's field names and spellings (the FileStatus and
ChunkStatus documents' upper-case statuses, the image requests' lower-case ones).
Nested counters are created at insert (`processingStats` skeleton), the form that works
on every server, since some wire-compatible servers mishandle a dotted `$inc` that has
to create its parents.

A chunk's move touches two documents: the chunk, and its file's counters. How they stay
exact depends on what the server can do, asked once per client (`supports_transactions`):
- a replica set member or a mongos: both writes in one multi-document transaction
  (`with_transaction`, which retries TransientTransactionError and
  UnknownTransactionCommitResult), so a crash leaves neither or both;
- a standalone server, which refuses transactions: the chunk is written, then the file's
  counters are recomputed from its chunk records and set under an optimistic guard
  (`statsVersion`), never `$inc`ed. A crash between the two leaves the counters behind
  until the next move of any chunk of that file, or `recount` from recovery, sets them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.alias_generators import to_camel
from pymongo import ASCENDING, MongoClient
from pymongo.client_session import ClientSession
from pymongo.errors import DuplicateKeyError, OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from s3proc_dagster.errors import ConcurrencyConflict, DuplicateRecord
from s3proc_dagster.models import (
    ChunkStatus,
    FileProcessingStats,
    FileStatus,
    ProcessingStatus,
    Request,
    RequestData,
    RequestStatus,
    S3UploadTask,
    empty_error_summary,
    success_rate,
    utcnow,
)
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.stores.cas import ANY_HOLDER
from s3proc_dagster.stores.chunks import ChunkGroup, totals_of_groups

T = TypeVar("T")
_RECOUNT_ATTEMPTS = 50


def _value(value: Any) -> Any:
    if isinstance(value, ProcessingStatus):
        return value.storage_name
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _stored_name(model: type[BaseModel], field: str) -> str:
    """A field's name in `model`'s documents: camelCase, or the name the document gives it
    (FileStatus's `source_key` is `s3Key`)."""
    info = model.model_fields.get(field)
    return info.serialization_alias if info is not None and info.serialization_alias else to_camel(field)


def _set(model: type[BaseModel], fields: dict[str, Any]) -> dict[str, Any]:
    """snake_case fields of `model` to a `$set` document. User dicts (`metadata`,
    `errorSummary` rule names) keep their keys as given."""
    out = {_stored_name(model, k): _doc(v) if isinstance(v, BaseModel) else _value(v) for k, v in fields.items()}
    if isinstance(out.get("processingStats"), dict):
        out["processingStats"] = {to_camel(k): v for k, v in out["processingStats"].items()}
    return out


def _doc(model: Any) -> dict[str, Any]:
    doc = model.model_dump(by_alias=True)
    return {k: _value(v) for k, v in doc.items()}


def supports_transactions(client: MongoClient) -> bool:
    """Whether the deployment runs multi-document transactions: a replica set member
    (`setName`) from 4.0 or a mongos (`msg: isdbgrid`) from 4.2, with sessions
    (`logicalSessionTimeoutMinutes`). A standalone mongod answers a transaction with
    "Transaction numbers are only allowed on a replica set member or mongos"."""
    try:
        hello = client.admin.command("hello")
    except OperationFailure:  # before 4.4.2
        hello = client.admin.command("isMaster")
    if hello.get("logicalSessionTimeoutMinutes") is None:
        return False
    if hello.get("msg") == "isdbgrid":
        return hello.get("maxWireVersion", 0) >= 8
    return bool(hello.get("setName")) and hello.get("maxWireVersion", 0) >= 7


def _counter_paths(flat: dict[str, int]) -> dict[str, int]:
    """A chunk move's delta as document paths: `completed_chunks` is
    `processingStats.completedChunks`, `validation.<rule>` is under `errorSummary`."""
    out = {}
    for key, value in flat.items():
        if "." in key:
            out[f"errorSummary.{key}"] = value
        else:
            out[f"processingStats.{to_camel(key)}"] = value
    return out


def _load(cls: Any, doc: dict[str, Any] | None) -> Any:
    if doc is None:
        return None
    doc.pop("_id", None)
    if cls in (FileStatus, ChunkStatus):
        doc["status"] = ProcessingStatus.parse(doc["status"])
    return cls.model_validate(doc)


class MongoProgressStore(ProgressStore):
    def __init__(
        self, uri: str, database: str, client: MongoClient | None = None, *, transactions: bool | None = None
    ) -> None:
        """`transactions`: None asks the server (once, here); False forces the
        standalone path on a replica set, e.g. to test it against a real one."""
        self._client = client or MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=10000)
        self.transactions = supports_transactions(self._client) if transactions is None else transactions
        db = self._client[database]
        self.files = db["FileStatus"]
        self.chunks = db["ChunkStatus"]
        self.requests = db["Requests"]
        self.rows = db["RequestData"]
        self.uploads = db["S3UploadTask"]
        self.files.create_index([("fileId", ASCENDING)], unique=True)
        self.files.create_index([("filePath", ASCENDING)], unique=True)
        self.files.create_index([("status", ASCENDING)])
        self.chunks.create_index([("chunkId", ASCENDING)], unique=True)
        self.chunks.create_index([("fileId", ASCENDING), ("chunkIndex", ASCENDING)])
        self.requests.create_index([("requestId", ASCENDING)], unique=True)
        self.rows.create_index([("requestId", ASCENDING), ("serialNumber", ASCENDING)], unique=True)
        self.uploads.create_index([("id", ASCENDING)], unique=True)
        self.uploads.create_index([("bucket", ASCENDING), ("s3Key", ASCENDING), ("checksum", ASCENDING)], unique=True)
        self.uploads.create_index([("fileId", ASCENDING)])

    def close(self) -> None:
        self._client.close()

    def _atomically(self, work: Callable[[ClientSession | None], T]) -> T:
        """`work(session)` in one transaction where the server has them, else `work(None)`.

        `with_transaction` runs `work` again on TransientTransactionError (a write
        conflict with another transaction, a primary stepping down) and retries the
        commit on UnknownTransactionCommitResult, for up to 120 s; `work` only computes
        from its arguments and what it reads through the session, so running it twice
        is safe. Snapshot reads and majority commits: what a transaction read is what
        it wrote against, and what it wrote survives a failover.
        """
        if not self.transactions:
            return work(None)
        with self._client.start_session() as session:
            return session.with_transaction(
                work, read_concern=ReadConcern("snapshot"), write_concern=WriteConcern("majority")
            )

    # ---- files ---------------------------------------------------------------------------

    def _insert_file(self, status: FileStatus) -> bool:
        try:
            self.files.insert_one({**_doc(status), "statsVersion": 0})
        except DuplicateKeyError:
            return False
        return True

    def _load_file(self, *, file_id: str | None = None, path: str | None = None) -> FileStatus | None:
        query = {"fileId": file_id} if file_id is not None else {"filePath": path}
        return _load(FileStatus, self.files.find_one(query))

    def _list_files(self, status: ProcessingStatus | None) -> list[FileStatus]:
        query = {} if status is None else {"status": status.storage_name}
        return [_load(FileStatus, d) for d in self.files.find(query).sort("createdAt", ASCENDING)]

    def _cas_file(
        self, file_id: str, expected: ProcessingStatus, fields: dict[str, Any], expected_run_id: Any = ANY_HOLDER
    ) -> bool:
        query: dict[str, Any] = {"fileId": file_id, "status": expected.storage_name}
        if expected_run_id is not ANY_HOLDER:
            query["runId"] = expected_run_id  # None also matches a record written before runId existed
        result = self.files.update_one(query, {"$set": {**_set(FileStatus, fields), "lastUpdatedAt": utcnow()}})
        return result.matched_count == 1

    # ---- chunks --------------------------------------------------------------------------

    def _replace_chunks(self, file_id: str, chunks: list[ChunkStatus], file_fields: dict[str, Any]) -> None:
        def replace(session: ClientSession | None) -> None:
            self.chunks.delete_many({"fileId": file_id}, session=session)
            if chunks:
                self.chunks.insert_many([_doc(c) for c in chunks], session=session)
            self.files.update_one(
                {"fileId": file_id},
                {"$set": {**_set(FileStatus, file_fields), "lastUpdatedAt": utcnow()}},
                session=session,
            )
            self._recount_once(file_id, session, guarded=False)

        if self.transactions:
            self._atomically(replace)
        else:
            # Three writes with nothing around them: set the counters from the new plan
            # under the same guard as after a chunk move, so a crash mid-way heals the same way.
            self.chunks.delete_many({"fileId": file_id})
            if chunks:
                self.chunks.insert_many([_doc(c) for c in chunks])
            self.files.update_one(
                {"fileId": file_id}, {"$set": {**_set(FileStatus, file_fields), "lastUpdatedAt": utcnow()}}
            )
            self._recount(file_id)

    def _add_chunk(self, chunk: ChunkStatus, file_delta: dict[str, int]) -> bool:
        def add(session: ClientSession | None) -> bool:
            try:
                self.chunks.insert_one(_doc(chunk), session=session)
            except DuplicateKeyError:
                return False
            self._add_to_counters(chunk.file_id, file_delta, session)
            return True

        return self._atomically(add)

    def _load_chunks(self, file_id: str, session: ClientSession | None = None) -> list[ChunkStatus]:
        cursor = self.chunks.find({"fileId": file_id}, session=session).sort("chunkIndex", ASCENDING)
        return [_load(ChunkStatus, d) for d in cursor]

    def list_all_chunks(self) -> list[ChunkStatus]:
        cursor = self.chunks.find({}).sort([("fileId", ASCENDING), ("chunkIndex", ASCENDING)])
        return [_load(ChunkStatus, d) for d in cursor]

    def _load_chunk(self, chunk_id: str) -> ChunkStatus | None:
        return _load(ChunkStatus, self.chunks.find_one({"chunkId": chunk_id}))

    def _cas_chunk(
        self,
        chunk: ChunkStatus,
        expected: ProcessingStatus,
        expected_retry: int,
        fields: dict[str, Any],
        file_delta: dict[str, int],
    ) -> bool:
        updates = _set(ChunkStatus, fields)
        if "processingStats" in updates:
            stats = updates["processingStats"]
            stats["successRate"] = success_rate(stats["successfulRecords"], stats["failedRecords"])
        query = {"chunkId": chunk.chunk_id, "status": expected.storage_name, "retryCount": expected_retry}

        def move(session: ClientSession | None) -> bool:
            if self.chunks.update_one(query, {"$set": updates}, session=session).matched_count != 1:
                return False
            self._add_to_counters(chunk.file_id, file_delta, session)
            return True

        return self._atomically(move)

    def _add_to_counters(self, file_id: str, delta: dict[str, int], session: ClientSession | None) -> None:
        """The second write of a chunk's move: `$inc` inside the move's transaction, or,
        without one, the counters recomputed from the chunk records (which also repairs
        what an earlier crash between the two writes left behind)."""
        if session is None:
            self._recount(file_id)
            return
        after = self.files.find_one_and_update(
            {"fileId": file_id},
            {"$inc": {**_counter_paths(delta), "statsVersion": 1}, "$set": {"lastUpdatedAt": utcnow()}},
            return_document=True,
            session=session,
        )
        if after is not None:
            stats = after.get("processingStats", {})
            rate = success_rate(stats.get("successfulRecords", 0), stats.get("failedRecords", 0))
            self.files.update_one({"fileId": file_id}, {"$set": {"processingStats.successRate": rate}}, session=session)

    def _recount(self, file_id: str) -> None:
        """Counters from the chunk records, set only if no other counter write (a recount,
        or a move's `$inc` in a transaction, both bump `statsVersion`) landed between
        reading the version and setting: then the records read are the ones at that
        moment, and a recount from an older read can never undo a newer one. No
        transaction needed, so it is the same on both kinds of server."""
        first: int | None = None
        for _ in range(_RECOUNT_ATTEMPTS):
            doc = self.files.find_one({"fileId": file_id}, {"statsVersion": 1})
            if doc is None:
                return
            version = doc.get("statsVersion")
            if first is None:
                first = version or 0
            elif not self.transactions and (version or 0) >= first + 2:
                # Without transactions every counter write is a recount. Version first+1
                # was set after this call began, so whoever then set first+2 read the
                # chunk records after ours changed: our move is counted.
                return
            if self._recount_once(file_id, None, guarded=True, version=version):
                return
        raise ConcurrencyConflict(f"file {file_id}: too many concurrent counter updates")

    def _chunk_groups(self, file_id: str, session: ClientSession | None) -> list[ChunkGroup]:
        """The file's chunks summed by status on the server: a recount follows every chunk
        move on a standalone server, so it ships one document per status, not per chunk."""
        pipeline = [
            {"$match": {"fileId": file_id}},
            {
                "$group": {
                    "_id": "$status",
                    "chunks": {"$sum": 1},
                    "ok": {"$sum": "$processingStats.successfulRecords"},
                    "bad": {"$sum": "$processingStats.failedRecords"},
                    "summaries": {"$push": "$errorSummary"},
                }
            },
        ]
        return [
            ChunkGroup(
                ProcessingStatus.parse(g["_id"]),
                g["chunks"],
                g["ok"],
                g["bad"],
                [summary for summary in g["summaries"] if summary],
            )
            for g in self.chunks.aggregate(pipeline, session=session)
        ]

    def _recount_once(
        self, file_id: str, session: ClientSession | None, *, guarded: bool, version: int | None = None
    ) -> bool:
        """Set the counters from the chunk records read now. `guarded`: only if no other
        recount landed since `version` was read (a recount from an older read would undo
        a newer one); each recount bumps `statsVersion`."""
        totals = totals_of_groups(self._chunk_groups(file_id, session))
        summary: dict[str, dict[str, int]] = empty_error_summary()
        for key, value in totals.items():
            if "." in key:
                kind, name = key.split(".", 1)
                summary.setdefault(kind, {})[name] = value
        stats = FileProcessingStats(**{k: v for k, v in totals.items() if "." not in k})
        query: dict[str, Any] = {"fileId": file_id}
        if guarded:
            query["statsVersion"] = version if version is not None else {"$exists": False}
        result = self.files.update_one(
            query,
            {
                "$set": {"processingStats": _doc(stats), "errorSummary": summary, "lastUpdatedAt": utcnow()},
                "$inc": {"statsVersion": 1},
            },
            session=session,
        )
        return result.matched_count == 1

    # ---- image requests ----------------------------------------------------------------------

    def _insert_request(self, request: Request, rows: list[RequestData]) -> None:
        try:
            self.requests.insert_one(_doc(request))
        except DuplicateKeyError:
            raise DuplicateRecord(f"request {request.request_id}: already recorded") from None
        if rows:
            self.rows.insert_many([_doc(r) for r in rows])

    def get_request(self, request_id: str) -> Request | None:
        return _load(Request, self.requests.find_one({"requestId": request_id}))

    def list_requests(self) -> list[Request]:
        return [_load(Request, d) for d in self.requests.find({}).sort("createdAt", ASCENDING)]

    def list_request_rows(self, request_id: str) -> list[RequestData]:
        cursor = self.rows.find({"requestId": request_id}).sort("serialNumber", ASCENDING)
        return [_load(RequestData, d) for d in cursor]

    def _cas_request(self, request_id: str, expected: RequestStatus, fields: dict[str, Any]) -> bool:
        result = self.requests.update_one(
            {"requestId": request_id, "status": expected.value}, {"$set": _set(Request, fields)}
        )
        return result.matched_count == 1

    def _update_row(self, request_id: str, serial_number: int, fields: dict[str, Any]) -> bool:
        result = self.rows.update_one(
            {"requestId": request_id, "serialNumber": serial_number}, {"$set": _set(RequestData, fields)}
        )
        return result.matched_count == 1

    # ---- multipart uploads (S3UploadTask) -------------------------------------------------

    def save_upload_task(self, task: S3UploadTask) -> None:
        doc = _doc(task)
        doc["updatedAt"] = utcnow()
        self.uploads.replace_one({"id": task.id}, doc, upsert=True)

    def find_upload_task(self, bucket: str, s3_key: str, checksum: str) -> S3UploadTask | None:
        return _load(S3UploadTask, self.uploads.find_one({"bucket": bucket, "s3Key": s3_key, "checksum": checksum}))

    def list_upload_tasks(self, file_id: str | None = None) -> list[S3UploadTask]:
        query = {} if file_id is None else {"fileId": file_id}
        return [_load(S3UploadTask, d) for d in self.uploads.find(query).sort("createdAt", ASCENDING)]

    def delete_upload_task(self, task_id: str) -> None:
        self.uploads.delete_one({"id": task_id})
