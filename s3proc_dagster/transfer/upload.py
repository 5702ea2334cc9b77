"""Streaming upload: one PutObject below the part size, multipart above it.

Memory is one part buffer (8 MiB by default) whatever the file size. The file's SHA-256
travels as `x-sha256` user metadata, which multipart uploads must declare when they are
created, so the hash is computed in a first read; the file is a local snapshot in page
cache, so that read costs far less than the network (measured in the README's benchmark).
A failure inside Python aborts the multipart upload at once; a killed process leaves it
behind, and crash recovery (`transfer.recovery.abort_stale_uploads`) finds it by listing
the unfinished uploads under the file's key, so no UploadId needs to be stored.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3proc_dagster.files.checksum import sha256_file

PART_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True)
class UploadResult:
    key: str
    size: int
    sha256: str
    etag: str
    parts: int


def upload_file(
    client: Any,
    bucket: str,
    key: str,
    path: Path,
    *,
    content_type: str,
    metadata: dict[str, str] | None = None,
    part_size: int = PART_SIZE,
) -> UploadResult:
    size = path.stat().st_size
    sha256 = sha256_file(path)
    meta = {**(metadata or {}), "x-sha256": sha256}
    if size <= part_size:
        with path.open("rb") as body:
            response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata=meta)
        return UploadResult(key, size, sha256, response["ETag"].strip('"'), 1)

    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type, Metadata=meta)["UploadId"]
    try:
        completed = []
        with path.open("rb") as source:
            number = 1
            while block := source.read(part_size):
                md5 = hashlib.md5(block, usedforsecurity=False)
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


def upload_bytes(
    client: Any, bucket: str, key: str, data: bytes, *, content_type: str, metadata: dict[str, str] | None = None
) -> UploadResult:
    """Small documents (manifests): one PutObject with the same `x-sha256` metadata."""
    sha256 = hashlib.sha256(data).hexdigest()
    response = client.put_object(
        Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata={**(metadata or {}), "x-sha256": sha256}
    )
    return UploadResult(key, len(data), sha256, response["ETag"].strip('"'), 1)
