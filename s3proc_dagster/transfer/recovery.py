"""What crash recovery needs from S3: open multipart uploads and objects to remove."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from s3proc_dagster.errors import s3_error_code


def open_uploads(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every unfinished multipart upload under `prefix` (Key, UploadId, Initiated)."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Uploads", [])


def abort(client: Any, bucket: str, key: str, upload_id: str) -> None:
    """Abort one upload; one that is already gone counts as aborted."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception as exc:
        if s3_error_code(exc) not in ("NoSuchUpload", "404"):
            raise


def delete_prefix(
    client: Any,
    bucket: str,
    prefix: str,
    keep: set[str] | frozenset[str] = frozenset(),
    only: Callable[[str], bool] = lambda _key: True,
) -> int:
    """Delete objects under `prefix` that `only` admits, except `keep`, 1,000 per request; return how many."""
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [o["Key"] for o in page.get("Contents", []) if o["Key"] not in keep and only(o["Key"])]
        deleted += delete_keys(client, bucket, keys)
    return deleted


def delete_keys(client: Any, bucket: str, keys: list[str]) -> int:
    """Delete `keys` (absent ones too: S3 does not mind), 1,000 per request; return how many."""
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)
