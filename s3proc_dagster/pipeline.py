"""The steps of one file, as plain functions: the seed's ProcessingJob without an orchestrator.

Each function is one ProcessingStep. It takes what the previous step returned (small,
picklable records that point into the staging area) plus the store and S3 client, and
returns the next record. Dagster's ops call them one per step; `s3proc` and the tests
can call them directly. Every step reads the snapshot in the staging area, never the
original, so the original can change or move to the error directory without breaking a
retry, and every step is safe to run again: a finished chunk is skipped, an existing
conversion reused, an object overwritten under the same key.

Every step first makes sure its run still holds the file version (`Claimant`): one run
at a time works on a file, a re-execution takes over from its failed parent, and a run
whose version was superseded by a newer one stops instead of overwriting it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

from s3proc_dagster.errors import ChecksumMismatch, FileBusy, UnsupportedFileError
from s3proc_dagster.files.archives import extract
from s3proc_dagster.files.checksum import Snapshot, sha256_file, snapshot, snapshot_stream
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.detect import Detection, detect
from s3proc_dagster.files.staging import work_dir
from s3proc_dagster.files.tabular import DUCKDB_NULL_STRINGS, convert_to_parquet_chunks
from s3proc_dagster.files.validation import as_of_date, rule_set_for
from s3proc_dagster.logs import get_logger
from s3proc_dagster.models import ChunkStatus, FileStatus, FileType, ProcessingStatus, RejectedPart, make_file_id
from s3proc_dagster.stores.base import ClaimOutcome, ProgressStore
from s3proc_dagster.transfer import manifest as manifests
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.transfer.upload import upload_file
from s3proc_dagster.transfer.verify import object_matches, verify_object

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
class Claimant:
    """The run doing the work, and how to tell whether another run is still alive."""

    run_id: str
    is_alive: Callable[[str], bool]

    def hold(self, store: ProgressStore, file_id: str, version: str | None) -> FileStatus:
        return store.hold(file_id, self.run_id, self.is_alive, version)


@dataclass(frozen=True)
class FileVersion:
    """Step 1's result: the snapshot in staging, its checksum, and what to do with it.

    `outcome` is CLAIMED (this run processes it), UNCHANGED (this version is already
    COMPLETED) or BUSY (another live run, `holder`, is processing this same version).
    """

    file_id: str
    source: Source
    snapshot_path: str
    sha256: str
    size: int
    outcome: ClaimOutcome = ClaimOutcome.CLAIMED
    holder: str | None = None

    @property
    def needed(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED


@dataclass(frozen=True)
class WorkItem:
    """One thing to upload: the file itself, or one entry of an archive (its own record)."""

    file_id: str
    relative_path: str  # the S3 layout below the prefix: rel path, archive name as a folder
    local_path: str
    kind: str
    file_type: FileType
    content_type: str
    version: str = ""  # the record's checksum: the file's SHA-256, or `<archive sha>:<entry path>`


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
    skipped_rules: dict[str, str] = field(default_factory=dict)  # rule -> why it could not run

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


def take_snapshot(source: Source, local_path: Path, staging: Path, store: ProgressStore, claimant: Claimant) -> FileVersion:
    """Copy a local file into staging and hash it in one read, then claim this version."""
    return record_version(source, snapshot(local_path, staging), store, claimant, staging)


def record_version(
    source: Source, snap: Snapshot, store: ProgressStore, claimant: Claimant, staging: Path | None = None
) -> FileVersion:
    """Claim a snapshot as the file version this run processes.

    An unchanged COMPLETED version comes back UNCHANGED, and the same version held by
    another live run BUSY: either way nothing is done twice, and the snapshot just taken
    goes again (unless that other run uses it). Another version held by a live run raises
    FileBusy, a transient error: this run retries once that one is done.
    """
    claim = store.claim(
        FileStatus(
            file_id=source.file_id,
            file_path=source.uri,
            file_name=source.name,
            checksum=snap.sha256,
            file_size=snap.size,
            s3_bucket=source.s3_bucket,
            s3_key=source.s3_key,
            metadata=source.metadata,
        ),
        claimant.run_id,
        claimant.is_alive,
    )
    if claim.outcome is ClaimOutcome.BUSY and claim.record.checksum != snap.sha256:
        raise FileBusy(
            f"{source.relative_path}: run {claim.holder} is processing an earlier version; this version waits for it",
            claim.holder or "",
        )
    messages = {
        ClaimOutcome.CLAIMED: "snapshot taken",
        ClaimOutcome.UNCHANGED: "unchanged, skipped",
        ClaimOutcome.BUSY: f"already being processed by run {claim.holder}, skipped",
    }
    log.info(
        "%s: %s", source.relative_path, messages[claim.outcome],
        extra={"fields": {"fileId": claim.record.file_id, "sha256": snap.sha256, "bytes": snap.size}},
    )
    if claim.outcome is not ClaimOutcome.CLAIMED and staging is not None:
        staging_area.release(staging, snap.sha256, versions_in_use(store))
    return FileVersion(
        claim.record.file_id, source, str(snap.path), snap.sha256, snap.size, claim.outcome, claim.holder
    )


# ---- step 2: type_detection -------------------------------------------------------------------


def detect_type(version: FileVersion, store: ProgressStore, claimant: Claimant) -> Detection:
    claimant.hold(store, version.file_id, version.sha256)
    detection = detect(Path(version.snapshot_path), version.source.name)
    store.update_file(version.file_id, file_type=detection.file_type, content_type=detection.content_type)
    return detection


# ---- step 3: archive_extraction ---------------------------------------------------------------


def _claim_entry(
    store: ProgressStore,
    claimant: Claimant,
    version: FileVersion,
    rel: str,
    entry_path: str,
    local: Path,
    detection: Detection,
) -> tuple[str, str]:
    """Each archive entry gets its own record (own fileId, chunks, status), linked to the
    archive and held by the archive's run; its path reads `<archive>!/<entry path>`, as
    Java and zipfile URLs do. Returns the entry's fileId and version."""
    entry_version = f"{version.sha256}:{rel}"
    claim = store.claim(
        FileStatus(
            file_id=make_file_id(rel),
            file_path=f"{version.source.uri}!/{entry_path}",
            file_name=PurePosixPath(rel).name,
            checksum=entry_version,
            file_size=local.stat().st_size,
            file_type=detection.file_type,
            content_type=detection.content_type,
            metadata={**version.source.metadata, "archiveFileId": version.file_id},
        ),
        claimant.run_id,
        claimant.is_alive,
        reprocess_completed=True,
    )
    if claim.outcome is ClaimOutcome.BUSY:
        raise FileBusy(f"{rel}: run {claim.holder} is processing this entry", claim.holder or "")
    return claim.record.file_id, entry_version


def plan_work(
    version: FileVersion, detection: Detection, staging: Path, store: ProgressStore, claimant: Claimant
) -> list[WorkItem]:
    """The file itself, or every entry of an archive, each with its own detected type.

    An entry keeps the archive's inner structure below a folder named after the archive.
    Archives inside archives are uploaded as they are, not unpacked again (a bound on
    work and on nesting attacks).
    """
    claimant.hold(store, version.file_id, version.sha256)
    if detection.file_type is not FileType.ARCHIVE:
        return [
            WorkItem(
                version.file_id,
                version.source.relative_path,
                version.snapshot_path,
                detection.kind,
                detection.file_type,
                detection.content_type,
                version.sha256,
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
        file_id, entry_version = _claim_entry(store, claimant, version, rel, entry.relative_path, entry.path, entry_detection)
        items.append(
            WorkItem(
                file_id,
                rel,
                str(entry.path),
                entry_detection.kind,
                entry_detection.file_type,
                entry_detection.content_type,
                entry_version,
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
    claimant: Claimant,
    rules_dir: Path | None = None,
    as_of: date | None = None,
    csv_null_strings: Sequence[str] = DUCKDB_NULL_STRINGS,
) -> list[PreparedItem]:
    """Tabular items become Parquet chunks (one pass each, validated in the same pass
    when a rule set selects them); other items pass through.

    A finished conversion is kept next to its `_done.json`, so a re-executed step reuses
    it instead of converting again. The chunk plan belongs to this version: chunks that
    landed for an earlier version of the file are never taken for this one's.
    """
    claimant.hold(store, version.file_id, version.sha256)
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
            try:
                conversion = convert_to_parquet_chunks(
                    Path(item.local_path), item.kind, out_dir, chunk_size, compression,
                    rules=rule_set.render(as_of or as_of_date(None)) if rule_set else None,
                    required_columns=rule_set.columns if rule_set else (),
                    on_missing_columns=rule_set.on_missing_columns if rule_set else "skip_rules",
                    csv_null_strings=csv_null_strings,
                )
            except BaseException:
                shutil.rmtree(out_dir, ignore_errors=True)  # a failed pass leaves no partial parts
                raise
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
        planned = store.plan_chunks(item.file_id, result["record_count"], chunk_size, version=item.version)
        by_index = {c.chunk_index: c for c in planned}
        chunks = tuple(
            PreparedChunk(
                by_index[index].chunk_id,
                index,
                path,
                manifests.part_key(key, item.version, index),
                start,
                end,
                count,
                failed,
                rule_counts,
                rejected,
                manifests.part_key(key, item.version, index, rejected=True) if rejected else None,
            )
            for index, path, start, end, count, failed, rule_counts, rejected in result["chunks"]
        )
        skipped = result.get("skipped_rules", {})
        fields: dict[str, Any] = {"content_type": item.content_type, "file_type": item.file_type}
        if skipped:
            # Not a failure: the rule set said to skip rules a file lacks columns for. Recorded
            # beside the counts, as how many records each rule was not evaluated on.
            summary = store.require(item.file_id).error_summary
            fields["error_summary"] = {**summary, "skippedRules": dict.fromkeys(skipped, result["record_count"])}
            log.warning(
                "%s: rules skipped: %s", item.relative_path, "; ".join(f"{r} ({why})" for r, why in skipped.items()),
                extra={"fields": {"fileId": item.file_id}},
            )
        store.update_file(item.file_id, **fields)
        prepared.append(PreparedItem(item, key, result["record_count"], compression, chunks, skipped))
    return prepared


# ---- step 5: streaming (S3 upload) ------------------------------------------------------------------


def _already_uploaded(chunk: PreparedChunk, record: ChunkStatus, version: str, client: Any, bucket: str) -> bool:
    """A chunk of this very version, COMPLETED, whose objects are still in S3 with the
    recorded checksums, needs no upload."""
    if record.status is not S.COMPLETED or record.version != version or record.s3_key != chunk.key or not record.sha256:
        return False
    if not object_matches(client, bucket, chunk.key, record.size_bytes or 0, record.sha256):
        return False
    if chunk.rejected_key:
        rejected = record.rejected
        if rejected is None or rejected.s3_key != chunk.rejected_key:
            return False
        return object_matches(client, bucket, rejected.s3_key, rejected.size_bytes, rejected.sha256)
    return True


def upload_items(
    prepared: list[PreparedItem],
    version: FileVersion,
    client: Any,
    bucket: str,
    store: ProgressStore,
    claimant: Claimant,
    threads: int = UPLOAD_THREADS,
) -> Iterator[UploadedObject]:
    """Upload every chunk and plain object, yielding each as it lands (in chunk order).

    Chunks go up on a few threads: one chunk is a few MB, so a single stream spends most
    of its time on per-request latency. Finished chunks are skipped, so a retried or
    re-executed step never uploads a chunk twice; a chunk that fails is recorded FAILED
    with the reason before the error reaches Dagster's retry policy. A large plain file
    goes up as a multipart upload recorded in the store, so a retry resumes it.
    """
    claimant.hold(store, version.file_id, version.sha256)
    for item in prepared:
        if not item.is_dataset:
            yield _upload_plain(item, version, client, bucket, store)
            continue
        records = {c.chunk_index: c for c in store.list_chunks(item.item.file_id)}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="upload") as pool:
            yield from pool.map(
                lambda chunk: _upload_chunk(item, chunk, records[chunk.chunk_index], client, bucket, store),
                item.chunks,
            )


def _upload_chunk(
    item: PreparedItem, chunk: PreparedChunk, current: ChunkStatus, client: Any, bucket: str, store: ProgressStore
) -> UploadedObject:
    if _already_uploaded(chunk, current, item.item.version, client, bucket):
        return UploadedObject(
            item.item.file_id, item.item.relative_path, chunk.key, current.size_bytes or 0,
            current.sha256 or "", current.duration or 0.0, True, chunk.chunk_index,
            chunk.start_offset, chunk.end_offset, chunk.record_count, item.compression,
        )
    store.chunk_started(chunk.chunk_id, worker_name())
    started = time.monotonic()
    rejected = None
    try:
        result = upload_file(
            client, bucket, chunk.key, Path(chunk.local_path),
            content_type="application/vnd.apache.parquet",
            metadata={"x-completed": "true", "x-file-id": item.item.file_id},
            journal=store, file_id=item.item.file_id,
        )
        if chunk.rejected_path and chunk.rejected_key:
            sent = upload_file(
                client, bucket, chunk.rejected_key, Path(chunk.rejected_path),
                content_type="application/vnd.apache.parquet",
                metadata={"x-completed": "true", "x-file-id": item.item.file_id, "x-rejected": "true"},
                journal=store, file_id=item.item.file_id,
            )
            verify_object(client, bucket, sent.key, sent.size, sent.sha256)
            rejected = RejectedPart(s3_key=sent.key, size_bytes=sent.size, sha256=sent.sha256, records=chunk.failed_records)
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
        validation_errors=chunk.rule_counts, rejected=rejected,
    )
    return UploadedObject(
        item.item.file_id, item.item.relative_path, chunk.key, result.size, result.sha256, duration,
        False, chunk.chunk_index, chunk.start_offset, chunk.end_offset, chunk.record_count, item.compression,
    )


def _upload_plain(item: PreparedItem, version: FileVersion, client: Any, bucket: str, store: ProgressStore) -> UploadedObject:
    started = time.monotonic()
    local = Path(item.item.local_path)
    known = version.sha256 if item.item.file_id == version.file_id else None
    result = upload_file(
        client, bucket, item.key, local,
        content_type=item.item.content_type,
        metadata={"x-completed": "true", "x-file-id": item.item.file_id},
        journal=store, file_id=item.item.file_id, sha256=known,
    )
    if result.parts_sent < result.parts:
        log.info(
            "%s: resumed a multipart upload, %d of %d parts were already in S3",
            item.item.relative_path, result.parts - result.parts_sent, result.parts,
            extra={"fields": {"fileId": item.item.file_id, "s3Key": item.key}},
        )
    return UploadedObject(
        item.item.file_id, item.item.relative_path, item.key, result.size, result.sha256,
        time.monotonic() - started, False,
    )


# ---- step 6: integrity_verification --------------------------------------------------------------


def verify_items(
    prepared: list[PreparedItem],
    version: FileVersion,
    client: Any,
    bucket: str,
    store: ProgressStore,
    claimant: Claimant,
) -> list[manifests.Manifest]:
    """Check every object against the store (size, SHA-256), then commit each dataset:
    the manifest is swapped in last and the previous version's objects go after it, so a
    reader never sees a partial dataset or two versions at once."""
    claimant.hold(store, version.file_id, version.sha256)
    committed = []
    for item in prepared:
        if not item.is_dataset:
            local = Path(item.item.local_path)
            known = version.sha256 if item.item.file_id == version.file_id else sha256_file(local)
            verify_object(client, bucket, item.key, local.stat().st_size, known)
            continue
        chunks = [c for c in store.list_chunks(item.item.file_id) if c.version == item.item.version]
        for chunk in chunks:
            verify_object(client, bucket, chunk.s3_key or "", chunk.size_bytes or 0, chunk.sha256 or "")
            if chunk.rejected:
                verify_object(client, bucket, chunk.rejected.s3_key, chunk.rejected.size_bytes, chunk.rejected.sha256)
        manifest = manifests.Manifest(
            dataset_key=item.key,
            file_sha256=item.item.version,  # the record's checksum: an archive entry's reads `<archive sha>:<path>`
            total_rows=item.record_count or 0,
            total_bytes=sum(c.size_bytes or 0 for c in chunks),
            compression=item.compression or "",
            chunks=[
                manifests.ManifestPart(
                    c.chunk_index, c.s3_key or "", c.record_count - (c.rejected.records if c.rejected else 0),
                    c.size_bytes or 0, c.sha256 or "", c.start_offset, c.end_offset,
                )
                for c in chunks
            ],
            rejected=[
                manifests.ManifestPart(
                    c.chunk_index, c.rejected.s3_key, c.rejected.records, c.rejected.size_bytes, c.rejected.sha256,
                    rules=c.error_summary.get("validation", {}),
                )
                for c in chunks
                if c.rejected
            ],
        )
        removed = manifests.commit(client, bucket, manifest)
        if removed:
            log.info(
                "%s: committed version %s, %d object(s) of earlier versions removed",
                item.item.relative_path, manifest.file_sha256[:12], removed,
                extra={"fields": {"fileId": item.item.file_id}},
            )
        committed.append(manifest)
    return committed


# ---- step 7: progress_update ------------------------------------------------------------------------


def finish(
    prepared: list[PreparedItem],
    version: FileVersion,
    prefix: str,
    store: ProgressStore,
    claimant: Claimant,
    staging: Path | None = None,
) -> FileStatus:
    """Mark every entry and then the file COMPLETED with where its output lives; with
    `staging`, release the version's staging unless another file still needs it."""
    claimant.hold(store, version.file_id, version.sha256)
    for item in prepared:
        if item.item.file_id != version.file_id:
            claimant.hold(store, item.item.file_id, item.item.version)
            store.complete(
                item.item.file_id, item.key, processed_bytes=Path(item.item.local_path).stat().st_size,
                run_id=claimant.run_id,
            )
    own = [p.key for p in prepared if p.item.file_id == version.file_id]
    output_key = own[0] if own else join_key(prefix, version.source.relative_path)
    done = store.complete(version.file_id, output_key, processed_bytes=version.size, run_id=claimant.run_id)
    log.info("%s: COMPLETED", version.source.relative_path, extra={"fields": {"fileId": version.file_id, "s3Key": output_key}})
    if staging is not None:
        staging_area.release(staging, version.sha256, versions_in_use(store))
    return done


def versions_in_use(store: ProgressStore) -> set[str]:
    """Staged versions a file may still need: those of files IN_PROGRESS or FAILED."""
    records = [*store.list_files(S.IN_PROGRESS), *store.list_files(S.FAILED)]
    return {v for r in records if (v := staging_area.version_of(r.checksum))}
