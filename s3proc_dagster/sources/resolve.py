"""What a run is asked to process: a local path or an `s3://` URI, turned into a Source.

One rule for every way a run starts (the sensors, `s3proc process`, `dagster job launch`,
the Launchpad): the relative path is the path below WATCH_PATH, or the key below
S3_INCOMING_PREFIX; the file's metadata comes from its sidecar or its object's user
metadata. The fileId derives from the relative path, so a file has the same id whichever
way it came.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from s3proc_dagster.errors import RecordNotFound
from s3proc_dagster.models import make_file_id
from s3proc_dagster.sources.metadata import read_sidecar
from s3proc_dagster.sources.paths import relative_to_watch
from s3proc_dagster.sources.s3_incoming import metadata_from_object


@dataclass(frozen=True)
class Source:
    """Where a file came from: a path under the watched directory, or an S3 object."""

    uri: str  # absolute local path, or s3://bucket/key
    relative_path: str  # below the watched directory or the S3 incoming prefix
    s3_bucket: str | None = None
    s3_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return PurePosixPath(self.relative_path).name

    @property
    def file_id(self) -> str:
        return make_file_id(self.relative_path)

    @property
    def is_object(self) -> bool:
        return self.s3_key is not None


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def relative_key(key: str, incoming_prefix: str) -> str:
    """An object's path below the incoming prefix (the whole key when it is elsewhere)."""
    root = incoming_prefix.strip("/") + "/" if incoming_prefix.strip("/") else ""
    return key.removeprefix(root)


def resolve_source(
    target: str, watch_path: Path, incoming_prefix: str = "", client: Any = None, relative_path: str = ""
) -> Source:
    """The Source `target` names, with its metadata; `relative_path` overrides the rule.

    Raises RecordNotFound when a local file does not exist (a permanent error: it will
    not appear by retrying), UnsupportedFileError for a malformed sidecar.
    """
    if target.startswith("s3://"):
        bucket, key = split_uri(target)
        head = client.head_object(Bucket=bucket, Key=key) if client is not None else {}
        return Source(
            uri=target,
            relative_path=relative_path or relative_key(key, incoming_prefix),
            s3_bucket=bucket,
            s3_key=key,
            metadata=metadata_from_object(head.get("Metadata", {})),
        )
    path = Path(target).resolve()
    if not path.is_file():
        raise RecordNotFound(f"{target}: no such file")
    return Source(
        uri=str(path), relative_path=relative_path or relative_to_watch(path, watch_path), metadata=read_sidecar(path)
    )
