"""What a run is asked to process: a local path or an `s3://` URI, turned into a Source.

One rule for every way a run starts (the sensors, `s3proc process`, `dagster job launch`,
the Launchpad) and for everything that later needs the run's file (the failure hook,
crash recovery): `locate` says where the file is and what it is called, from the run's
config alone, and `resolve_source` adds its metadata. The relative path is the path
below WATCH_PATH, or the key below S3_INCOMING_PREFIX; the fileId derives from it, so a
file has the same id whichever way it came. Nothing a producer controls (a sidecar,
object metadata, a link) can change where a file is or what it is called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from s3proc_dagster.errors import RecordNotFound
from s3proc_dagster.models import make_file_id
from s3proc_dagster.sources.confined import is_regular, lexically_below
from s3proc_dagster.sources.metadata import check_metadata, read_sidecar
from s3proc_dagster.sources.names import check_canonical, check_source_path
from s3proc_dagster.sources.s3_incoming import metadata_from_object
from s3proc_dagster.transfer import verify
from s3proc_dagster.transfer.keys import is_s3_uri, prefix_folder, split_uri


@dataclass(frozen=True)
class Source:
    """Where a file came from: a path under the watched directory, or an S3 object.

    `root` is the watched directory a local file was found below (opened without
    following links from there, `sources.confined`); None for an object, or for a file
    the operator named outside it.
    """

    uri: str  # absolute local path, or s3://bucket/key
    relative_path: str  # below the watched directory or the S3 incoming prefix
    bucket: str | None = None  # the object's, for an S3 object
    key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    zone: str = ""  # the declared landing zone it came from; "" for the default zone

    @property
    def name(self) -> str:
        return PurePosixPath(self.relative_path).name

    @property
    def file_id(self) -> str:
        return make_file_id(self.relative_path, self.zone)

    @property
    def is_object(self) -> bool:
        return self.key is not None

    @property
    def roots(self) -> tuple[Path, ...]:
        return (Path(self.root),) if self.root else ()


def relative_key(key: str, incoming_prefix: str) -> str:
    """An object's path below the incoming prefix (the whole key when it is elsewhere)."""
    return key.removeprefix(prefix_folder(incoming_prefix))


def locate(target: str, watch_path: Path, incoming_prefix: str = "", relative_path: str = "", zone: str = "") -> Source:
    """Where `target` is and its relative path, without reading it; `relative_path` overrides the rule.

    A local path is taken as spelled (`..` folded, the last component never resolved), so
    a link in the watched directory stays a link, which `sources.confined` then refuses to
    follow. Only the folder above it is resolved when the spelling is not below
    WATCH_PATH, so a path through a symlinked checkout still finds its watched file. A
    file outside WATCH_PATH is known by its name alone. The relative path must be one
    canonical spelling (`sources.names`).
    """
    if is_s3_uri(target):
        bucket, key = split_uri(target)
        rel = check_canonical(relative_path or relative_key(key, incoming_prefix))
        return Source(uri=target, relative_path=rel, bucket=bucket, key=key, zone=zone)
    path = Path(os.path.normpath(os.path.abspath(target)))
    below = lexically_below(path, watch_path)
    if below is None:
        through = path.parent.resolve() / path.name
        below = lexically_below(through, watch_path)
        path = through if below is not None else path
    rel = check_canonical(relative_path or below or path.name)
    return Source(uri=str(path), relative_path=rel, root=str(watch_path) if below is not None else None, zone=zone)


def resolve_source(
    target: str,
    watch_path: Path,
    incoming_prefix: str = "",
    client: Any = None,
    relative_path: str = "",
    reserved: tuple[str, ...] = (),
    zone: str = "",
    watched: Mapping[str, str] | None = None,
) -> Source:
    """`locate`, and the file's metadata from its sidecar or its object's user metadata.

    Raises RecordNotFound when a local file or an object does not exist (a permanent error:
    it will not appear by retrying), ObjectUnreadable when S3 cannot be asked about an
    object, UnsupportedFileError for a malformed sidecar, UnsafeSourceError for a path that
    is not canonical, would land inside another file's dataset or in the
    product's `reserved` folders, or in a folder another zone watches (`watched`,
    `sources.names`).
    """
    source = locate(target, watch_path, incoming_prefix, relative_path, zone)
    check_source_path(source.relative_path, reserved, watched)
    if source.is_object:
        head = verify.head(client, source.bucket or "", source.key or "") if client is not None else {}
        if head is None:  # a permanent answer: retrying a 404 only delayed the same failure
            raise RecordNotFound(
                f"{source.uri}: no such object: it was deleted or renamed after the sensor listed it; "
                "nothing was read (upload it again to have it processed)"
            )
        metadata = metadata_from_object(head.get("Metadata", {}))
        check_metadata(metadata, f"{source.relative_path}: its object's user metadata")
    else:
        if not os.path.lexists(source.uri):
            raise RecordNotFound(f"{target}: no such file")
        metadata = read_sidecar(Path(source.uri), source.roots) if is_regular(source.uri) else {}
    return replace(source, metadata=metadata)
