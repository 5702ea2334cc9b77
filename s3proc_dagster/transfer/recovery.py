"""What crash recovery needs from S3: unfinished uploads, stray objects, completion markers."""

from __future__ import annotations

from typing import Any


def abort_stale_uploads(client: Any, bucket: str, prefix: str) -> list[str]:
    """Abort every unfinished multipart upload under `prefix`; return their keys."""
    aborted = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(upload["Key"])
    return aborted


def delete_prefix(client: Any, bucket: str, prefix: str, keep: set[str] | frozenset[str] = frozenset()) -> int:
    """Delete objects under `prefix` except `keep`, 1,000 per request; return how many."""
    deleted = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        doomed = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["Key"] not in keep]
        for start in range(0, len(doomed), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": doomed[start : start + 1000], "Quiet": True})
        deleted += len(doomed)
    return deleted


def has_completion_marker(client: Any, bucket: str, key: str) -> bool:
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - absent or unreadable: not complete
        return False
    return head.get("Metadata", {}).get("x-completed") == "true"
