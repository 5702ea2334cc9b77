"""Verification: an object is what we uploaded only if its size and SHA-256 match."""

from __future__ import annotations

import hashlib
from typing import Any

from s3proc_dagster.errors import ChecksumMismatch


def verify_object(client: Any, bucket: str, key: str, expected_size: int, expected_sha256: str, deep: bool = False) -> None:
    """HEAD checks size and the `x-sha256` we stored; `deep` streams the bytes back and
    hashes them, for when the metadata itself is not trusted."""
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - 404 and friends all mean "not verified"
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise ChecksumMismatch(f"s3://{bucket}/{key}: cannot be read back ({code})") from None
    if head["ContentLength"] != expected_size:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: {head['ContentLength']} bytes in S3, expected {expected_size}")
    stored = head.get("Metadata", {}).get("x-sha256")
    if stored != expected_sha256:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: sha256 {stored} in S3, expected {expected_sha256}")
    if deep:
        digest = hashlib.sha256()
        for block in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
            digest.update(block)
        if digest.hexdigest() != expected_sha256:
            raise ChecksumMismatch(f"s3://{bucket}/{key}: content hashes to {digest.hexdigest()}, expected {expected_sha256}")
