"""The staging area is a cache, not a record: what a step finds missing, it derives again.

A step that finds the snapshot, the extracted entries or the chunks it needs missing (a
re-execution on another node, a wiped disk) fetches the source again, checked against
the recorded SHA-256, and derives the rest from it, never from anything only the first
node had. Every node of a deployment has the same STAGING_DIRECTORY (one image, one set
of settings), so the paths a step's records carry are valid on any of them; only the
files behind them may be missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from s3proc_dagster.errors import ChecksumMismatch, SourceChanged, UnsafeSourceError, s3_error_code
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.archives import extract
from s3proc_dagster.files.checksum import Snapshot, snapshot, snapshot_stream
from s3proc_dagster.files.chunks import ChunkFile
from s3proc_dagster.files.detect import detect
from s3proc_dagster.files.staging import private_work_dir
from s3proc_dagster.logs import about, get_logger
from s3proc_dagster.models import make_file_id
from s3proc_dagster.pipeline.context import StepContext
from s3proc_dagster.pipeline.records import FileVersion, WorkItem
from s3proc_dagster.sources.resolve import Source

log = get_logger("pipeline")


def staging_root(version: FileVersion) -> Path:
    """The staging area the version's paths point into (`<staging>/<sha256>/<name>`)."""
    return Path(version.snapshot_path).parent.parent


def parquet_dir(version: FileVersion, item: WorkItem) -> Path:
    """Where an item's Parquet chunks are written, beside the version's snapshot."""
    return private_work_dir(staging_root(version), version.sha256) / "parquet" / make_file_id(item.relative_path)


def chunks_on_disk(chunk: ChunkFile) -> bool:
    return Path(chunk.path).is_file() and (chunk.rejected_path is None or Path(chunk.rejected_path).is_file())


def snapshot_object(client: Any, bucket: str, key: str, staging: Path, max_bytes: int | None = None) -> Snapshot:
    """Stream an incoming object into staging, hashing as it goes; the object itself is
    only read, never modified or deleted. Its size, and its `x-sha256` when it has one,
    must match what arrived; one over `max_bytes` (MAX_FILE_BYTES) is refused unread."""
    obj = client.get_object(Bucket=bucket, Key=key)
    if max_bytes is not None and obj["ContentLength"] > max_bytes:
        obj["Body"].close()
        raise UnsafeSourceError(
            f"s3://{bucket}/{key}: {obj['ContentLength']:,} bytes is over MAX_FILE_BYTES ({max_bytes:,})"
        )
    snap = snapshot_stream(obj["Body"], PurePosixPath(key).name, staging, max_bytes)
    if snap.size != obj["ContentLength"]:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: read {snap.size} bytes, object has {obj['ContentLength']}")
    expected = obj.get("Metadata", {}).get("x-sha256")
    if expected and expected != snap.sha256:
        raise ChecksumMismatch(
            f"s3://{bucket}/{key}: its bytes hash to sha256 {snap.sha256}, its x-amz-meta-x-sha256 says {expected}"
        )
    return snap


def staged_snapshot(ctx: StepContext, version: FileVersion) -> Path:
    """The version's snapshot on this node: the staged copy, or the source read again.

    A node that never saw the file fetches it from where it came from: the watched path on
    shared storage, the error directory its run parked it in (`failure.give_up`), or the
    incoming object, hashing as it goes. Bytes other than the recorded version's fail the
    run for good with SourceChanged: the file changed since the run started, and its new
    version is a new run's work, never this one's.
    """
    path = Path(version.snapshot_path)
    if path.is_file():
        return path
    source, staging = version.source, staging_root(version)
    if source.is_object and ctx.client is None:
        raise ValueError(f"{source.uri}: an S3 client is needed to fetch the snapshot again")
    found: list[tuple[str, str]] = []  # (where, its sha256) of each copy that is not this version
    for fetch_from, fetch in _fetchers(ctx, source, staging):
        try:
            snap = fetch()
        except Exception as exc:
            if isinstance(exc, FileNotFoundError) or s3_error_code(exc) in ("NoSuchKey", "404"):
                continue
            raise
        if snap.sha256 == version.sha256:
            log.info(
                "%s: snapshot fetched again from %s (none on this node)",
                source.relative_path,
                fetch_from,
                extra=about(version.file_id, sha256=snap.sha256, bytes=snap.size),
            )
            return snap.path
        staging_area.release(staging, snap.sha256, staging_area.versions_in_use(ctx.store))
        found.append((fetch_from, snap.sha256))
    if found:
        where, sha = found[0]
        raise SourceChanged(
            f"{source.relative_path}: the file changed since the run started: {where} now has sha256 {sha}, "
            f"this run processes {version.sha256}; the new version is left to a run of its own"
        )
    raise SourceChanged(
        f"{source.relative_path}: the file changed since the run started: {source.uri} is gone, "
        f"and this node has no snapshot of version {version.sha256}"
    )


def _fetchers(ctx: StepContext, source: Source, staging: Path) -> list[tuple[str, Callable[[], Snapshot]]]:
    """Where a snapshot can come from again, in order: the object, or the file where it was
    found and where a failed run parked it (each opened without following links)."""
    if source.is_object:
        bucket, key = source.bucket or "", source.key or ""
        return [(source.uri, partial(snapshot_object, ctx.client, bucket, key, staging))]
    places = [Path(source.uri)]
    roots = source.roots
    if ctx.error_dir is not None:
        places.append(ctx.error_dir / source.relative_path)
        roots += (ctx.error_dir,)
    return [(str(place), partial(snapshot, place, staging, roots)) for place in places]


def staged_items(ctx: StepContext, version: FileVersion, items: Sequence[WorkItem]) -> None:
    """Make sure every item's local copy is on this node: the snapshot, or the archive's
    entries extracted again from it (the same paths: extraction is deterministic)."""
    missing = [item for item in items if not Path(item.local_path).is_file()]
    if not missing:
        return
    snap = staged_snapshot(ctx, version)
    if all(item.local_path == version.snapshot_path for item in missing):
        return
    detection = detect(snap, version.source.name)
    extract(snap, detection.kind, private_work_dir(staging_root(version), version.sha256) / "extracted")
    log.info(
        "%s: archive extracted again (its entries were not on this node)",
        version.source.relative_path,
        extra=about(version.file_id),
    )
