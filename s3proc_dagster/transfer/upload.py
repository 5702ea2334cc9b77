"""Streaming upload: one PutObject below the part size, multipart above it.

Memory is one part buffer (8 MiB by default) whatever the file size. The file's SHA-256
travels as `x-sha256` user metadata, which multipart uploads must declare when they are
created, so the hash is computed in a first read; the file is a local snapshot in page
cache, so that read costs far less than the network (measured in the README's benchmark).
The UploadId is handed to the caller as soon as it exists, so a crashed upload can be
resumed (parts already there and intact are not sent again) or aborted by recovery.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from s3proc_dagster.files.checksum import sha256_file

PART_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class UploadResult:
    key: str
    size: int
    sha256: str
    etag: str
    parts: int


def _existing_parts(client: Any, bucket: str, key: str, upload_id: str) -> dict[int, dict]:
    parts: dict[int, dict] = {}
    try:
        kwargs = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
        while True:
            page = client.list_parts(**kwargs)
            for part in page.get("Parts", []):
                parts[part["PartNumber"]] = part
            if not page.get("IsTruncated"):
                return parts
            kwargs["PartNumberMarker"] = page["NextPartNumberMarker"]
    except client.exceptions.NoSuchUpload:
        return {}


def upload_file(
    client: Any,
    bucket: str,
    key: str,
    path: Path,
    *,
    content_type: str,
    metadata: dict[str, str] | None = None,
    part_size: int = PART_SIZE,
    on_upload_id: Callable[[str], None] | None = None,
    resume_upload_id: str | None = None,
) -> UploadResult:
    size = path.stat().st_size
    sha256 = sha256_file(path)
    meta = {**(metadata or {}), "x-sha256": sha256}
    if size <= part_size and not resume_upload_id:
        with path.open("rb") as body:
            response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata=meta)
        return UploadResult(key, size, sha256, response["ETag"].strip('"'), 1)

    existing: dict[int, dict] = {}
    upload_id = None
    if resume_upload_id:
        existing = _existing_parts(client, bucket, key, resume_upload_id)
        upload_id = resume_upload_id if existing or _upload_alive(client, bucket, key, resume_upload_id) else None
    if upload_id is None:
        upload_id = client.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType=content_type, Metadata=meta
        )["UploadId"]
    if on_upload_id:
        on_upload_id(upload_id)
    try:
        completed = []
        with path.open("rb") as source:
            number = 1
            while block := source.read(part_size):
                md5 = hashlib.md5(block, usedforsecurity=False)
                have = existing.get(number)
                if have and have["Size"] == len(block) and have["ETag"].strip('"') == md5.hexdigest():
                    etag = have["ETag"]
                else:
                    etag = client.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=block,
                        ContentMD5=base64.b64encode(md5.digest()).decode(),
                    )["ETag"]
                completed.append({"PartNumber": number, "ETag": etag})
                number += 1
        response = client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": completed}
        )
    except Exception:
        # A Python-level failure leaves nothing behind; a killed process leaves the upload
        # for crash recovery (abort_stale_uploads) to find.
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    return UploadResult(key, size, sha256, response["ETag"].strip('"'), len(completed))


def _upload_alive(client: Any, bucket: str, key: str, upload_id: str) -> bool:
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key)
    return any(u["UploadId"] == upload_id and u["Key"] == key for p in pages for u in p.get("Uploads", []))


def upload_bytes(
    client: Any, bucket: str, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
) -> UploadResult:
    """Small documents (manifests): one PutObject with the same `x-sha256` metadata."""
    sha256 = hashlib.sha256(data).hexdigest()
    response = client.put_object(
        Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata={**(metadata or {}), "x-sha256": sha256}
    )
    return UploadResult(key, len(data), sha256, response["ETag"].strip('"'), 1)
