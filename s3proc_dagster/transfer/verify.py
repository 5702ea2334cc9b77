"""Verification: an object is what we uploaded only if its size and SHA-256 match.

Three outcomes are kept apart because they call for different actions: the object is
there with other bytes (ChecksumMismatch), it is not there (ObjectMissing), or S3 could
not be asked (ObjectUnreadable, a network error or a 5xx). All three are worth a retry;
only the first two mean "upload it again".
"""

from __future__ import annotations

import hashlib
from typing import Any

from s3proc_dagster.errors import ChecksumMismatch, ObjectMissing, ObjectUnreadable, s3_error_code

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD, or None when it does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        code = s3_error_code(exc)
        if code in NOT_FOUND_CODES:
            return None
        raise ObjectUnreadable(f"s3://{bucket}/{key}: cannot be read back ({code or type(exc).__name__})") from None


def verify_object(
    client: Any, bucket: str, key: str, expected_size: int, expected_sha256: str, deep: bool = False
) -> None:
    """HEAD checks size and the `x-sha256` we stored; `deep` streams the bytes back and
    hashes them, for when the metadata itself is not trusted."""
    found = head(client, bucket, key)
    if found is None:
        raise ObjectMissing(f"s3://{bucket}/{key}: not in S3")
    if found["ContentLength"] != expected_size:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: {found['ContentLength']} bytes in S3, expected {expected_size}")
    stored = found.get("Metadata", {}).get("x-sha256")
    if stored != expected_sha256:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: sha256 {stored} in S3, expected {expected_sha256}")
    if deep:
        digest = hashlib.sha256()
        for block in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
            digest.update(block)
        if digest.hexdigest() != expected_sha256:
            raise ChecksumMismatch(
                f"s3://{bucket}/{key}: content hashes to {digest.hexdigest()}, expected {expected_sha256}"
            )


def object_matches(client: Any, bucket: str, key: str, expected_size: int, expected_sha256: str) -> bool:
    """True when the object is there with this size and `x-sha256`. An S3 that cannot be
    asked raises (ObjectUnreadable): "unknown" must never be taken for "absent"."""
    try:
        verify_object(client, bucket, key, expected_size, expected_sha256)
    except (ChecksumMismatch, ObjectMissing):
        return False
    return True
