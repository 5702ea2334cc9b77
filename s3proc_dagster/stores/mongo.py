"""MongoDB backend: collections `FileStatus`, `ChunkStatus`, `Requests`, `RequestData`.

Documents use the seeds' field names and spellings (seed 000's upper-case statuses,
seed 002's lower-case ones). Counters move with `$inc` so concurrent runs never lose
an update; nested counters are created at insert (`processingStats` skeleton), the form
that works on every server, since some wire-compatible servers mishandle a dotted `$inc`
that has to create its parents.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel
from pymongo import ASCENDING, MongoClient
from pymongo.errors import DuplicateKeyError

from s3proc_dagster.errors import DuplicateRecord
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
from s3proc_dagster.stores.base import ANY_HOLDER, ProgressStore


def _value(value: Any) -> Any:
    if isinstance(value, ProcessingStatus):
        return value.storage_name
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _set(fields: dict[str, Any]) -> dict[str, Any]:
    """snake_case FileStatus/ChunkStatus fields to a `$set` document. User dicts
    (`metadata`, `errorSummary` rule names) keep their keys as given."""
    out = {to_camel(k): _doc(v) if isinstance(v, BaseModel) else _value(v) for k, v in fields.items()}
    if isinstance(out.get("processingStats"), dict):
        out["processingStats"] = {to_camel(k): v for k, v in out["processingStats"].items()}
    return out


def _doc(model: Any) -> dict[str, Any]:
    doc = model.model_dump(by_alias=True)
    return {k: _value(v) for k, v in doc.items()}


def _load(cls: Any, doc: dict[str, Any] | None) -> Any:
    if doc is None:
        return None
    doc.pop("_id", None)
    if cls in (FileStatus, ChunkStatus):
        doc["status"] = ProcessingStatus.parse(doc["status"])
    return cls.model_validate(doc)


class MongoProgressStore(ProgressStore):
    def __init__(self, uri: str, database: str, client: MongoClient | None = None) -> None:
        self._client = client or MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=10000)
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

    # ---- files ---------------------------------------------------------------------------

    def _insert_file(self, status: FileStatus) -> bool:
        try:
            self.files.insert_one(_doc(status))
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
        result = self.files.update_one(query, {"$set": {**_set(fields), "lastUpdatedAt": utcnow()}})
        return result.matched_count == 1

    # ---- chunks --------------------------------------------------------------------------

    def _replace_chunks(self, file_id: str, chunks: list[ChunkStatus], file_fields: dict[str, Any]) -> None:
        self.chunks.delete_many({"fileId": file_id})
        if chunks:
            self.chunks.insert_many([_doc(c) for c in chunks])
        stats = FileProcessingStats(pending_chunks=len(chunks))
        self.files.update_one(
            {"fileId": file_id},
            {
                "$set": {
                    **_set(file_fields),
                    "processingStats": _doc(stats),
                    "errorSummary": empty_error_summary(),
                    "lastUpdatedAt": utcnow(),
                }
            },
        )

    def _load_chunks(self, file_id: str) -> list[ChunkStatus]:
        return [_load(ChunkStatus, d) for d in self.chunks.find({"fileId": file_id}).sort("chunkIndex", ASCENDING)]

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
        updates = _set(fields)
        if "processingStats" in updates:
            stats = updates["processingStats"]
            stats["successRate"] = success_rate(stats["successfulRecords"], stats["failedRecords"])
        result = self.chunks.update_one(
            {"chunkId": chunk.chunk_id, "status": expected.storage_name, "retryCount": expected_retry},
            {"$set": updates},
        )
        if result.matched_count != 1:
            return False
        inc = {}
        for key, value in file_delta.items():
            if "." in key:
                inc[f"errorSummary.{key}"] = value
            else:
                inc[f"processingStats.{to_camel(key)}"] = value
        after = self.files.find_one_and_update(
            {"fileId": chunk.file_id},
            {"$inc": inc, "$set": {"lastUpdatedAt": utcnow()}},
            return_document=True,
        )
        if after is not None:
            stats = after.get("processingStats", {})
            rate = success_rate(stats.get("successfulRecords", 0), stats.get("failedRecords", 0))
            self.files.update_one({"fileId": chunk.file_id}, {"$set": {"processingStats.successRate": rate}})
        return True

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
        result = self.requests.update_one({"requestId": request_id, "status": expected.value}, {"$set": _set(fields)})
        return result.matched_count == 1

    def _update_row(self, request_id: str, serial_number: int, fields: dict[str, Any]) -> bool:
        result = self.rows.update_one({"requestId": request_id, "serialNumber": serial_number}, {"$set": _set(fields)})
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
