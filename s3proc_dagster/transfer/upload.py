"""Streaming upload: one PutObject below the part size, a resumable multipart upload above it.

Memory is one part buffer (8 MiB by default) whatever the file size. The file's SHA-256
travels as `x-sha256` user metadata, which a multipart upload must declare when it is
created, so the hash is computed in a first read; the file is a local snapshot in page
cache, so that read costs far less than the network (measured by benchmarks/run.py, docs/performance.md).

A multipart upload is recorded (`S3UploadTask`: bucket, key, the content's SHA-256 and
the UploadId) in a journal, the progress store, as soon as S3 hands out its UploadId.
When the same bytes are uploaded to the same key again (a step retry after an S3 outage,
a re-execution, a rerun after a crash), the upload resumes: the parts S3 already holds
(`list_parts`) whose size and MD5 match the local bytes are kept, the rest are sent. A
failed upload is therefore left in place for its retry, never aborted here; giving up is
the caller's decision (`abort_upload`), and a sweep aborts what nobody will resume.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from s3proc_dagster.errors import s3_error_code
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import S3UploadTask, UploadStatus

PART_SIZE = 8 * 1024 * 1024
PROGRESS_EVERY_PARTS = 4  # uploadedBytes in the journal every 32 MiB: progress without a write per part


class UploadJournal(Protocol):
    """Where multipart uploads are recorded: the progress store implements it."""

    def save_upload_task(self, task: S3UploadTask) -> None: ...

    def find_upload_task(self, bucket: str, s3_key: str, checksum: str) -> S3UploadTask | None: ...

    def delete_upload_task(self, task_id: str) -> None: ...


@dataclass(frozen=True)
class UploadResult:
    key: str
    size: int
    sha256: str
    etag: str
    parts: int
    parts_sent: int  # parts this call sent; the others were already in S3 (a resumed upload)


def upload_file(
    client: Any,
    bucket: str,
    key: str,
    path: Path,
    *,
    content_type: str,
    metadata: dict[str, str] | None = None,
    part_size: int = PART_SIZE,
    journal: UploadJournal | None = None,
    file_id: str | None = None,
    sha256: str | None = None,
) -> UploadResult:
    """Upload `path` to `key`; `sha256`, when the caller already knows it, saves a read."""
    size = path.stat().st_size
    sha256 = sha256 or sha256_file(path)
    meta = {**(metadata or {}), "x-sha256": sha256}
    if size <= part_size:
        with path.open("rb") as body:
            response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata=meta)
        return UploadResult(key, size, sha256, response["ETag"].strip('"'), 1, 1)
    task, have = _resume_or_create(
        client,
        journal,
        bucket,
        key,
        path=path,
        size=size,
        sha256=sha256,
        content_type=content_type,
        meta=meta,
        file_id=file_id,
    )
    etag, parts, sent = _send_parts(client, path, task, have, part_size, journal)
    return UploadResult(key, size, sha256, etag, parts, sent)


def _resume_or_create(
    client: Any,
    journal: UploadJournal | None,
    bucket: str,
    key: str,
    *,
    path: Path,
    size: int,
    sha256: str,
    content_type: str,
    meta: dict[str, str],
    file_id: str | None,
) -> tuple[S3UploadTask, dict[int, tuple[str, int]]]:
    """The journal's upload of these bytes to this key and the parts S3 holds of it; or, when
    there is none or S3 no longer has it, a new upload (under the journal's id, if any),
    recorded as soon as S3 hands out its UploadId."""
    task = journal.find_upload_task(bucket, key, sha256) if journal else None
    have = _parts_in_s3(client, bucket, key, task.upload_id) if task and task.upload_id else None
    if task is not None and have is not None:
        return task, have
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type, Metadata=meta)[
        "UploadId"
    ]
    task = S3UploadTask(
        id=task.id if task else uuid.uuid4().hex,
        source_file_path=str(path),
        s3_key=key,
        bucket=bucket,
        content_type=content_type,
        size=size,
        upload_id=upload_id,
        checksum=sha256,
        metadata=meta,
        status=UploadStatus.UPLOADING,
        file_id=file_id,
    )
    if journal:
        journal.save_upload_task(task)
    return task, {}


def _send_parts(
    client: Any,
    path: Path,
    task: S3UploadTask,
    have: dict[int, tuple[str, int]],
    part_size: int,
    journal: UploadJournal | None,
) -> tuple[str, int, int]:
    """Send the parts S3 does not hold yet (size and MD5 tell), then complete the upload: its
    ETag, its parts, the parts sent. A failure is recorded in the journal with the progress
    made and the upload left in place, for the retry to resume."""
    assert task.upload_id is not None
    bucket, key = task.bucket, task.s3_key
    completed, sent = [], 0
    try:
        with path.open("rb") as source:
            number = 1
            while block := source.read(part_size):
                md5 = hashlib.md5(block, usedforsecurity=False)
                etag = have.get(number, (None, -1))
                if etag[0] == md5.hexdigest() and etag[1] == len(block):
                    completed.append({"PartNumber": number, "ETag": f'"{etag[0]}"'})
                else:
                    response = client.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=task.upload_id,
                        PartNumber=number,
                        Body=block,
                        ContentMD5=base64.b64encode(md5.digest()).decode(),
                    )
                    completed.append({"PartNumber": number, "ETag": response["ETag"]})
                    sent += 1
                task = task.model_copy(update={"uploaded_bytes": source.tell(), "status": UploadStatus.UPLOADING})
                if journal and number % PROGRESS_EVERY_PARTS == 0:
                    journal.save_upload_task(task)
                number += 1
        if journal:  # every part is in S3: what is left is S3 assembling and checking them
            journal.save_upload_task(task.model_copy(update={"status": UploadStatus.VERIFYING}))
        response = client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=task.upload_id, MultipartUpload={"Parts": completed}
        )
    except Exception as exc:
        if journal:  # keep the UploadId: the retry resumes from the parts that made it
            failed = task.model_copy(
                update={"status": UploadStatus.FAILED, "error": f"{type(exc).__name__}: {exc}"[:500]}
            )
            with contextlib.suppress(Exception):
                journal.save_upload_task(failed)
        raise
    if journal:
        journal.delete_upload_task(task.id)
    return response["ETag"].strip('"'), len(completed), sent


def _parts_in_s3(client: Any, bucket: str, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
    """Part number -> (MD5 hex, size) of an unfinished upload; None if S3 no longer has it."""
    parts: dict[int, tuple[str, int]] = {}
    try:
        for page in client.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id):
            for part in page.get("Parts", []):
                parts[part["PartNumber"]] = (part["ETag"].strip('"'), part["Size"])
    except Exception as exc:
        if s3_error_code(exc) in ("NoSuchUpload", "404", "NoSuchKey"):
            return None  # completed or aborted meanwhile: start a new upload
        raise
    return parts


def abort_upload(client: Any, task: S3UploadTask, journal: UploadJournal | None = None) -> bool:
    """Give an upload up: abort it in S3 and forget it. False when S3 could not be reached
    (the record stays, so the sweep tries again later)."""
    try:
        client.abort_multipart_upload(Bucket=task.bucket, Key=task.s3_key, UploadId=task.upload_id)
    except Exception as exc:
        if s3_error_code(exc) not in ("NoSuchUpload", "404"):
            return False
    if journal:
        journal.delete_upload_task(task.id)
    return True


def upload_bytes(
    client: Any, bucket: str, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
) -> UploadResult:
    """Small documents (manifests): one PutObject with the same `x-sha256` metadata."""
    sha256 = hashlib.sha256(data).hexdigest()
    response = client.put_object(
        Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata={**(metadata or {}), "x-sha256": sha256}
    )
    return UploadResult(key, len(data), sha256, response["ETag"].strip('"'), 1, 1)
