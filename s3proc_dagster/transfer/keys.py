"""S3 keys and URIs: one joiner, one parser, one test, so every key is built and read the same way."""

from __future__ import annotations

S3_SCHEME = "s3://"


def join_key(*parts: str) -> str:
    """Join key parts with single slashes, dropping empty parts (an empty S3_PREFIX)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def prefix_folder(prefix: str) -> str:
    """A key prefix as the folder it names, `a/b/` (empty for the bucket's top)."""
    cleaned = prefix.strip("/")
    return cleaned + "/" if cleaned else ""


def is_s3_uri(text: str) -> bool:
    """Whether a path, a record's filePath or an argument names an S3 object (`s3://...`)."""
    return text.startswith(S3_SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    return bucket, key


def s3_uri(bucket: str, key: str) -> str:
    return f"{S3_SCHEME}{bucket}/{key}"
