"""S3 keys: one joiner, so every key the product writes is built the same way."""

from __future__ import annotations


def join_key(*parts: str) -> str:
    """Join key parts with single slashes, dropping empty parts (an empty S3_PREFIX)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
