"""The steps of one file, as plain functions: the seed's ProcessingJob without an orchestrator.

Each function is one ProcessingStep. It takes what the previous step returned (small,
picklable records that point into the staging area) plus the store and S3 client, and
returns the next record. Dagster's ops call them one per step; `s3proc` and the tests
can call them directly. Every step reads the snapshot in the staging area, never the
original, so the original can change or move to the error directory without breaking a
retry, and every step is safe to run again: a finished chunk is skipped, an existing
conversion reused, an object overwritten under the same key.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from s3proc_dagster.errors import ChecksumMismatch, UnsupportedFileError
from s3proc_dagster.files.archives import extract
from s3proc_dagster.files.checksum import Snapshot, snapshot, snapshot_stream
from s3proc_dagster.files.detect import Detection, detect
from s3proc_dagster.files.tabular import convert_to_parquet_chunks
from s3proc_dagster.files.validation import as_of_date, rule_set_for
from s3proc_dagster.logs import get_logger
from s3proc_dagster.models import ChunkStatus, FileStatus, FileType, ProcessingStatus, make_file_id
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.transfer.manifest import Manifest, write_manifest
from s3proc_dagster.transfer.upload import upload_file
from s3proc_dagster.transfer.verify import verify_object

S = ProcessingStatus
log = get_logger("pipeline")
UPLOAD_THREADS = 8
TABULAR_KINDS = {"csv", "tsv", "json", "jsonl", "xml"}


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


@dataclass(frozen=True)
class FileVersion:
    """Step 1's result: the snapshot in staging, its checksum, and whether work is needed."""

    file_id: str
    source: Source
    snapshot_path: str
    sha256: str
    size: int
    needed: bool


@dataclass(frozen=True)
class WorkItem:
    """One thing to upload: the file itself, or one entry of an archive (its own record)."""

    file_id: str
    relative_path: str  # the S3 layout below the prefix: rel path, archive name as a folder
    local_path: str
    kind: str
    file_type: FileType
    content_type: str


@dataclass(frozen=True)
class PreparedChunk:
    chunk_id: str
    chunk_index: int
    local_path: str
    key: str
    start_offset: int
    end_offset: int
    record_count: int
    failed_records: int = 0
    rule_counts: dict[str, int] = field(default_factory=dict)
    rejected_path: str | None = None
    rejected_key: str | None = None


@dataclass(frozen=True)
class PreparedItem:
    """A work item ready to upload: a Parquet dataset (chunks) or one object as it is."""

    item: WorkItem
    key: str  # dataset prefix for tabular items, object key otherwise
    record_count: int | None = None
    compression: str | None = None
    chunks: tuple[PreparedChunk, ...] = ()

    @property
    def is_dataset(self) -> bool:
        return self.item.kind in TABULAR_KINDS


@dataclass(frozen=True)
class UploadedObject:
    """One object now in S3 (a chunk or a whole file), for the run's materializations."""

    file_id: str
    relative_path: str
    key: str
    size: int
    sha256: str
    duration_s: float
    skipped: bool
    chunk_index: int | None = None
    start_offset: int | None = None
    end_offset: int | None = None
    record_count: int | None = None
    compression: str | None = None


def worker_name() -> str:
    """seed 000's processingThread: which host, process and thread did the work."""
    return f"{socket.gethostname()}-pid{os.getpid()}-{threading.current_thread().name}"


def work_dir(staging: Path, sha256: str) -> Path:
    """Where a version's extracted entries and Parquet chunks go: beside its snapshot
    (`<staging>/<sha256>/<name>`), never inside it, so no file name can collide."""
    return staging / f"{sha256}.work"


# ---- step 1: checksum_calculation ------------------------------------------------------------


def snapshot_s3_object(client: Any, bucket: str, key: str, staging: Path) -> Snapshot:
    """Stream an incoming object into staging, hashing as it goes; the object itself is
    only read, never modified or deleted. Its size, and its `x-sha256` when it has one,
    must match what arrived."""
    obj = client.get_object(Bucket=bucket, Key=key)
    snap = snapshot_stream(obj["Body"], PurePosixPath(key).name, staging)
    if snap.size != obj["ContentLength"]:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: read {snap.size} bytes, object has {obj['ContentLength']}")
    expected = obj.get("Metadata", {}).get("x-sha256")
    if expected and expected != snap.sha256:
        raise ChecksumMismatch(f"s3://{bucket}/{key}: sha256 {snap.sha256}, object says {expected}")
    return snap


def take_snapshot(source: Source, local_path: Path, staging: Path, store: ProgressStore) -> FileVersion:
    """Copy a local file into staging and hash it in one read, then record this version."""
    return record_version(source, snapshot(local_path, staging), store)


def record_version(source: Source, snap: Snapshot, store: ProgressStore) -> FileVersion:
    """Record a snapshot as this file's current version.

    An unchanged COMPLETED file comes back with `needed=False`: nothing is uploaded again.
    """
    status, needed = store.record_detected(
        FileStatus(
            file_id=source.file_id,
            file_path=source.uri,
            file_name=source.name,
            checksum=snap.sha256,
            file_size=snap.size,
            s3_bucket=source.s3_bucket,
            s3_key=source.s3_key,
            metadata=source.metadata,
        )
    )
    if needed:
        ensure_in_progress(store, status.file_id)
    log.info(
        "%s: %s", source.relative_path, "snapshot taken" if needed else "unchanged, skipped",
        extra={"fields": {"fileId": status.file_id, "sha256": snap.sha256, "bytes": snap.size}},
    )
    return FileVersion(status.file_id, source, str(snap.path), snap.sha256, snap.size, needed)


def ensure_in_progress(store: ProgressStore, file_id: str) -> FileStatus:
    """Bring a record to IN_PROGRESS from wherever a (re-)execution finds it.

    A re-execution from failure in the UI is the seed's manual retry: FAILED goes back
    to PENDING, then starts again.
    """
    status = store.require(file_id)
    if status.status is S.IN_PROGRESS:
        return status
    if status.status in (S.FAILED, S.COMPLETED):
        store.reset_to_pending(file_id, None)
    return store.start(file_id)


# ---- step 2: type_detection -------------------------------------------------------------------


def detect_type(version: FileVersion, store: ProgressStore) -> Detection:
    ensure_in_progress(store, version.file_id)
    detection = detect(Path(version.snapshot_path), version.source.name)
    store.update_file(version.file_id, file_type=detection.file_type, content_type=detection.content_type)
    return detection


# ---- step 3: archive_extraction ---------------------------------------------------------------


def _entry_record(
    store: ProgressStore, version: FileVersion, rel: str, entry_path: str, local: Path, detection: Detection
) -> str:
    """Each archive entry gets its own record (own fileId, chunks, status), linked to the
    archive; its path reads `<archive>!/<entry path>`, as Java and zipfile URLs do."""
    file_id = make_file_id(rel)
    status, _ = store.record_detected(
        FileStatus(
            file_id=file_id,
            file_path=f"{version.source.uri}!/{entry_path}",
            file_name=PurePosixPath(rel).name,
            checksum=f"{version.sha256}:{rel}",
            file_size=local.stat().st_size,
            file_type=detection.file_type,
            content_type=detection.content_type,
            metadata={**version.source.metadata, "archiveFileId": version.file_id},
        )
    )
    ensure_in_progress(store, status.file_id)
    return status.file_id


def plan_work(version: FileVersion, detection: Detection, staging: Path, store: ProgressStore) -> list[WorkItem]:
    """The file itself, or every entry of an archive, each with its own detected type.

    An entry keeps the archive's inner structure below a folder named after the archive.
    Archives inside archives are uploaded as they are, not unpacked again (a bound on
    work and on nesting attacks).
    """
    ensure_in_progress(store, version.file_id)
    if detection.file_type is not FileType.ARCHIVE:
        return [
            WorkItem(
                version.file_id,
                version.source.relative_path,
                version.snapshot_path,
                detection.kind,
                detection.file_type,
                detection.content_type,
            )
        ]
    dest = work_dir(staging, version.sha256) / "extracted"
    entries = extract(Path(version.snapshot_path), detection.kind, dest)
    items: list[WorkItem] = []
    for entry in entries:
        rel = join_key(version.source.relative_path, entry.relative_path)
        try:
            entry_detection = detect(entry.path, PurePosixPath(entry.relative_path).name)
        except UnsupportedFileError as exc:
            raise UnsupportedFileError(f"{version.source.name}: entry {entry.relative_path}: {exc}") from None
        if entry_detection.file_type is FileType.ARCHIVE:
            entry_detection = Detection(FileType.REGULAR, "regular", entry_detection.extension, entry_detection.content_type)
        file_id = _entry_record(store, version, rel, entry.relative_path, entry.path, entry_detection)
        items.append(
            WorkItem(
                file_id,
                rel,
                str(entry.path),
                entry_detection.kind,
                entry_detection.file_type,
                entry_detection.content_type,
            )
        )
    return items


# ---- step 4: parquet_conversion -----------------------------------------------------------------


def convert_items(
    items: list[WorkItem],
    version: FileVersion,
    staging: Path,
    prefix: str,
    chunk_size: int,
    compression: str,
    store: ProgressStore,
    rules_dir: Path | None = None,
    as_of: date | None = None,
) -> list[PreparedItem]:
    """Tabular items become Parquet chunks (one pass each, validated in the same pass
    when a rule set selects them); other items pass through.

    A finished conversion is kept next to its `_done.json`, so a re-executed step reuses
    it instead of converting again.
    """
    ensure_in_progress(store, version.file_id)
    prepared: list[PreparedItem] = []
    for item in items:
        key = join_key(prefix, item.relative_path)
        # Known before anything is written, so crash recovery can find partial output.
        store.update_file(item.file_id, output_key=key)
        if item.kind not in TABULAR_KINDS:
            prepared.append(PreparedItem(item, key))
            continue
        out_dir = work_dir(staging, version.sha256) / "parquet" / make_file_id(item.relative_path)
        done = out_dir / "_done.json"
        if done.exists():
            result = json.loads(done.read_text())
        else:
            rule_set = rule_set_for(item.relative_path, rules_dir) if rules_dir else None
            conversion = convert_to_parquet_chunks(
                Path(item.local_path), item.kind, out_dir, chunk_size, compression,
                rules=rule_set.render(as_of or as_of_date(None)) if rule_set else None,
                required_columns=rule_set.columns if rule_set else (),
                on_missing_columns=rule_set.on_missing_columns if rule_set else "skip_rules",
            )
            result = {
                "record_count": conversion.record_count,
                "rule_set": rule_set.name if rule_set else None,
                "skipped_rules": conversion.skipped_rules,
                "missing_columns": list(conversion.missing_columns),
                "chunks": [
                    [c.chunk_index, str(c.path), c.start_offset, c.end_offset, c.record_count,
                     c.failed_records, c.rule_counts, str(c.rejected_path) if c.rejected_path else None]
                    for c in conversion.chunks
                ],
            }
            done.write_text(json.dumps(result))
            log.info(
                "%s: %d records in %d chunks (%.2fs)", item.relative_path, conversion.record_count,
                len(conversion.chunks), conversion.duration_s,
                extra={"fields": {"fileId": item.file_id, "compression": compression}},
            )
        planned = store.plan_chunks(item.file_id, result["record_count"], chunk_size)
        by_index = {c.chunk_index: c for c in planned}
        chunks = tuple(
            PreparedChunk(
                by_index[index].chunk_id,
                index,
                path,
                join_key(key, f"part-{index:05d}.parquet"),
                start,
                end,
                count,
                failed,
                rule_counts,
                rejected,
                join_key(key, "_rejected", f"part-{index:05d}.parquet") if rejected else None,
            )
            for index, path, start, end, count, failed, rule_counts, rejected in result["chunks"]
        )
        store.update_file(item.file_id, content_type=item.content_type, file_type=item.file_type)
        prepared.append(PreparedItem(item, key, result["record_count"], compression, chunks))
    return prepared


# ---- step 5: streaming (S3 upload) ------------------------------------------------------------------


def _already_uploaded(chunk: ChunkStatus, client: Any, bucket: str) -> bool:
    """A COMPLETED chunk whose object is still there with our checksum needs no upload."""
    if chunk.status is not S.COMPLETED or not chunk.s3_key or not chunk.sha256:
        return False
    try:
        verify_object(client, bucket, chunk.s3_key, chunk.size_bytes or 0, chunk.sha256)
    except Exception:  # noqa: BLE001 - missing or different: upload again
        return False
    return True


def upload_items(
    prepared: list[PreparedItem],
    version: FileVersion,
    client: Any,
    bucket: str,
    store: ProgressStore,
    threads: int = UPLOAD_THREADS,
) -> Iterator[UploadedObject]:
    """Upload every chunk and plain object, yielding each as it lands (in chunk order).

    Chunks go up on a few threads: one chunk is a few MB, so a single stream spends most
    of its time on per-request latency. Finished chunks are skipped, so a retried or
    re-executed step never uploads a chunk twice; a chunk that fails is recorded FAILED
    with the reason before the error reaches Dagster's retry policy.
    """
    ensure_in_progress(store, version.file_id)
    for item in prepared:
        if not item.is_dataset:
            yield _upload_plain(item, client, bucket)
            continue
        status_by_index = {c.chunk_index: c for c in store.list_chunks(item.item.file_id)}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="upload") as pool:
            yield from pool.map(
                lambda chunk: _upload_chunk(item, chunk, status_by_index[chunk.chunk_index], client, bucket, store),
                item.chunks,
            )


def _upload_chunk(
    item: PreparedItem, chunk: PreparedChunk, current: ChunkStatus, client: Any, bucket: str, store: ProgressStore
) -> UploadedObject:
    if _already_uploaded(current, client, bucket):
        return UploadedObject(
            item.item.file_id, item.item.relative_path, chunk.key, current.size_bytes or 0,
            current.sha256 or "", current.duration or 0.0, True, chunk.chunk_index,
            chunk.start_offset, chunk.end_offset, chunk.record_count, item.compression,
        )
    store.chunk_started(chunk.chunk_id, worker_name())
    started = time.monotonic()
    try:
        result = upload_file(
            client, bucket, chunk.key, Path(chunk.local_path),
            content_type="application/vnd.apache.parquet",
            metadata={"x-completed": "true", "x-file-id": item.item.file_id},
        )
        if chunk.rejected_path and chunk.rejected_key:
            rejected = upload_file(
                client, bucket, chunk.rejected_key, Path(chunk.rejected_path),
                content_type="application/vnd.apache.parquet",
                metadata={"x-completed": "true", "x-file-id": item.item.file_id, "x-rejected": "true"},
            )
            verify_object(client, bucket, rejected.key, rejected.size, rejected.sha256)
    except Exception as exc:
        store.chunk_failed(chunk.chunk_id, f"{type(exc).__name__}: {exc}", error_kind="s3UploadFailure")
        raise
    duration = time.monotonic() - started
    log.debug(  # debug: each chunk already has its asset materialization in the run
        "%s: chunk %d uploaded (%d bytes, %.2fs)", item.item.relative_path, chunk.chunk_index, result.size, duration,
        extra={"fields": {"chunkId": chunk.chunk_id, "s3Key": chunk.key, "sha256": result.sha256}},
    )
    store.chunk_completed(
        chunk.chunk_id, s3_key=chunk.key, size_bytes=result.size, sha256=result.sha256, duration=duration,
        successful_records=chunk.record_count - chunk.failed_records, failed_records=chunk.failed_records,
        validation_errors=chunk.rule_counts,
    )
    return UploadedObject(
        item.item.file_id, item.item.relative_path, chunk.key, result.size, result.sha256, duration,
        False, chunk.chunk_index, chunk.start_offset, chunk.end_offset, chunk.record_count, item.compression,
    )


def _upload_plain(item: PreparedItem, client: Any, bucket: str) -> UploadedObject:
    started = time.monotonic()
    result = upload_file(
        client, bucket, item.key, Path(item.item.local_path),
        content_type=item.item.content_type,
        metadata={"x-completed": "true", "x-file-id": item.item.file_id},
    )
    return UploadedObject(
        item.item.file_id, item.item.relative_path, item.key, result.size, result.sha256,
        time.monotonic() - started, False,
    )


# ---- step 6: integrity_verification --------------------------------------------------------------


def verify_items(
    prepared: list[PreparedItem], version: FileVersion, client: Any, bucket: str, store: ProgressStore
) -> list[Manifest]:
    """Check every object against the store (size, SHA-256), then write each dataset's
    manifest last: readers that wait for `_manifest.json` never see a partial dataset."""
    ensure_in_progress(store, version.file_id)
    manifests = []
    for item in prepared:
        if not item.is_dataset:
            from s3proc_dagster.files.checksum import sha256_file

            local = Path(item.item.local_path)
            verify_object(client, bucket, item.key, local.stat().st_size, sha256_file(local))
            continue
        chunks = store.list_chunks(item.item.file_id)
        for chunk in chunks:
            verify_object(client, bucket, chunk.s3_key or "", chunk.size_bytes or 0, chunk.sha256 or "")
        manifest = Manifest(
            dataset_key=item.key,
            file_sha256=version.sha256,
            total_rows=item.record_count or 0,
            total_bytes=sum(c.size_bytes or 0 for c in chunks),
            compression=item.compression or "",
            chunks=[
                {
                    "chunkIndex": c.chunk_index,
                    "key": c.s3_key,
                    "rows": c.record_count,
                    "bytes": c.size_bytes,
                    "sha256": c.sha256,
                    "startOffset": c.start_offset,
                    "endOffset": c.end_offset,
                }
                for c in chunks
            ],
            rejected=[
                {"chunkIndex": c.chunk_index, "key": c.rejected_key, "rows": c.failed_records, "rules": c.rule_counts}
                for c in item.chunks
                if c.rejected_key
            ],
        )
        write_manifest(client, bucket, item.key, manifest)
        manifests.append(manifest)
    return manifests


# ---- step 7: progress_update ------------------------------------------------------------------------


def finish(prepared: list[PreparedItem], version: FileVersion, prefix: str, store: ProgressStore) -> FileStatus:
    """Mark every entry and then the file COMPLETED with where its output lives."""
    ensure_in_progress(store, version.file_id)
    for item in prepared:
        if item.item.file_id != version.file_id:
            ensure_in_progress(store, item.item.file_id)
            store.complete(item.item.file_id, item.key, processed_bytes=Path(item.item.local_path).stat().st_size)
    own = [p.key for p in prepared if p.item.file_id == version.file_id]
    output_key = own[0] if own else join_key(prefix, version.source.relative_path)
    done = store.complete(version.file_id, output_key, processed_bytes=version.size)
    log.info("%s: COMPLETED", version.source.relative_path, extra={"fields": {"fileId": version.file_id, "s3Key": output_key}})
    return done
