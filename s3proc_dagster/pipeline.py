"""The steps of one file, as plain functions: the seed's ProcessingJob without an orchestrator.

Each function is one ProcessingStep. It takes what the previous step returned (small,
picklable records that point into the staging area) plus the store and S3 client, and
returns the next record. Dagster's ops call them one per step; `s3proc` and the tests
can call them directly. Every step reads the snapshot in the staging area, never the
original, so the original can change or move to the error directory without breaking a
retry, and every step is safe to run again: a finished chunk is skipped, an existing
conversion reused, an object overwritten under the same key.

The staging area is a cache, not a record: a step that finds the snapshot, the extracted
entries or chunks still to upload missing (a re-execution on another node, a wiped
disk) derives them again, from the source checked against the recorded SHA-256
(`staged_snapshot`), never from anything only the first node had.

Every step first makes sure its run still holds the file version (`Claimant`): one run
at a time works on a file, a re-execution takes over from its failed parent, and a run
whose version was superseded by a newer one stops instead of overwriting it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from s3proc_dagster.errors import (
    ChecksumMismatch,
    ConversionError,
    FileBusy,
    SourceChanged,
    UnsafeSourceError,
    UnsupportedFileError,
    s3_error_code,
)
from s3proc_dagster.files import parking
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.archives import extract
from s3proc_dagster.files.checksum import Snapshot, sha256_file, sha256_stream, snapshot, snapshot_stream
from s3proc_dagster.files.detect import TABULAR_KINDS, Detection, detect
from s3proc_dagster.files.staging import private_work_dir
from s3proc_dagster.files.tabular import DUCKDB_NULL_STRINGS, ChunkFile, ConversionResult, convert_to_parquet_chunks
from s3proc_dagster.files.validation import as_of_date, rule_set_for
from s3proc_dagster.logs import get_logger
from s3proc_dagster.models import (
    ChunkStatus,
    FileStatus,
    FileType,
    ProcessingStatus,
    RejectedPart,
    chunk_id,
    make_file_id,
)
from s3proc_dagster.sources.confined import is_regular, lexically_below, open_regular
from s3proc_dagster.sources.names import check_canonical, check_not_nested
from s3proc_dagster.sources.resolve import Source
from s3proc_dagster.stores.base import ClaimOutcome, ProgressStore
from s3proc_dagster.transfer import manifest as manifests
from s3proc_dagster.transfer.ahead import UploadAhead
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.transfer.recovery import delete_keys
from s3proc_dagster.transfer.upload import abort_upload, upload_file
from s3proc_dagster.transfer.verify import object_matches, verify_object

log = get_logger("pipeline")
UPLOAD_THREADS = 8
PARQUET_TYPE = "application/vnd.apache.parquet"


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
class ConversionRecipe:
    """Everything a conversion depends on, kept with its result so that a node without the
    chunk files converts again to the same chunks: the same boundaries, and the same
    validation (the rules' date is the one the first conversion used, not today's)."""

    chunk_size: int
    compression: str
    rules_dir: Path | None = None
    as_of: date | None = None
    csv_null_strings: tuple[str, ...] = DUCKDB_NULL_STRINGS


@dataclass(frozen=True)
class PreparedItem:
    """A work item ready to upload: a Parquet dataset (chunks) or one object as it is."""

    item: WorkItem
    key: str  # dataset prefix for tabular items, object key otherwise
    record_count: int | None = None
    compression: str | None = None
    chunks: tuple[ChunkFile, ...] = ()
    skipped_rules: dict[str, str] = field(default_factory=dict)  # rule -> why it could not run
    recipe: ConversionRecipe | None = None  # how `chunks` were made, to make them again
    sent_ahead: frozenset[int] = frozenset()  # chunks that landed during the conversion
    landed_in_run: str = ""  # the run whose conversion landed them
    numbers_as_text: dict[str, list[str]] = field(default_factory=dict)  # column -> the words that made it text

    @property
    def is_dataset(self) -> bool:
        return self.item.kind in TABULAR_KINDS

    def part_key(self, chunk: ChunkFile, rejected: bool = False) -> str:
        return manifests.part_key(self.key, self.item.version, chunk.chunk_index, rejected)

    def chunk_id(self, chunk: ChunkFile) -> str:
        return chunk_id(self.item.file_id, chunk.chunk_index)


@dataclass(frozen=True)
class UploadedObject:
    """One object now in S3 (a chunk or a whole file), for the run's materializations."""

    file_id: str
    relative_path: str
    key: str
    size: int
    sha256: str
    duration_s: float
    reused: bool  # already in S3 and verified: not sent again
    ahead: bool = False  # landed during this run's conversion, which reported it
    chunk: ChunkFile | None = None
    compression: str | None = None


def worker_name() -> str:
    """seed 000's processingThread: which host, process and thread did the work."""
    return f"{socket.gethostname()}-pid{os.getpid()}-{threading.current_thread().name}"


# ---- step 1: checksum_calculation ------------------------------------------------------------


def snapshot_s3_object(client: Any, bucket: str, key: str, staging: Path, max_bytes: int | None = None) -> Snapshot:
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
        raise ChecksumMismatch(f"s3://{bucket}/{key}: sha256 {snap.sha256}, object says {expected}")
    return snap


def take_snapshot(
    source: Source,
    staging: Path,
    store: ProgressStore,
    claimant: Claimant,
    client: Any = None,
    max_bytes: int | None = None,
) -> FileVersion:
    """Copy the file (or stream the object) into staging and hash it in one read, then
    claim this version. A local file is read without following links out of its root."""
    if source.is_object:
        snap = snapshot_s3_object(client, source.s3_bucket or "", source.s3_key or "", staging, max_bytes)
    else:
        snap = snapshot(Path(source.uri), staging, source.roots, max_bytes)
    return record_version(source, snap, store, claimant, staging)


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
        "%s: %s",
        source.relative_path,
        messages[claim.outcome],
        extra={"fields": {"fileId": claim.record.file_id, "sha256": snap.sha256, "bytes": snap.size}},
    )
    if claim.outcome is not ClaimOutcome.CLAIMED and staging is not None:
        staging_area.release(staging, snap.sha256, staging_area.versions_in_use(store))
    return FileVersion(
        claim.record.file_id, source, str(snap.path), snap.sha256, snap.size, claim.outcome, claim.holder
    )


# ---- the staging area is a cache ----------------------------------------------------------------


def staging_root(version: FileVersion) -> Path:
    """The staging area the version's paths point into (`<staging>/<sha256>/<name>`).

    Every node of a deployment has the same STAGING_DIRECTORY (one image, one set of
    settings), so the paths a step's outputs carry are valid on any of them; only the
    files behind them may be missing."""
    return Path(version.snapshot_path).parent.parent


@dataclass(frozen=True)
class Origin:
    """Where a step fetches a version's snapshot again when this node has none: an S3
    client for an incoming object; the error directory for a local file, which its run
    moved there (`give_up`) if it failed for good before being re-executed."""

    client: Any = None
    error_dir: Path | None = None

    def candidates(self, source: Source) -> list[Path]:
        """The local places a file may be, in order: where it was found, where it was parked."""
        places = [Path(source.uri)]
        if self.error_dir is not None:
            places.append(self.error_dir / source.relative_path)
        return places


def staged_snapshot(version: FileVersion, store: ProgressStore, origin: Origin | None = None) -> Path:
    """The version's snapshot on this node: the staged copy, or the source read again.

    A node that never saw the file (a re-execution on another machine, a wiped staging
    area) fetches it from where it came from, the watched path on shared storage (or the
    error directory it was parked in) or the incoming object, hashing as it goes. Bytes
    other than the recorded version's fail the run for good with SourceChanged: the file
    changed since the run started, and its new version is a new run's work, never this one's.
    """
    path = Path(version.snapshot_path)
    if path.is_file():
        return path
    origin = origin or Origin()
    source, staging = version.source, staging_root(version)
    if source.is_object and origin.client is None:
        raise ValueError(f"{source.uri}: an S3 client is needed to fetch the snapshot again")
    found: list[tuple[str, str]] = []  # (where, its sha256) of each copy that is not this version
    for fetch_from, fetch in _fetchers(source, origin, staging):
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
                extra={"fields": {"fileId": version.file_id, "sha256": snap.sha256, "bytes": snap.size}},
            )
            return snap.path
        staging_area.release(staging, snap.sha256, staging_area.versions_in_use(store))
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


def _fetchers(source: Source, origin: Origin, staging: Path) -> list[tuple[str, Callable[[], Snapshot]]]:
    if source.is_object:
        bucket, key = source.s3_bucket or "", source.s3_key or ""
        return [(source.uri, partial(snapshot_s3_object, origin.client, bucket, key, staging))]
    roots = source.roots + ((origin.error_dir,) if origin.error_dir is not None else ())
    return [(str(place), partial(snapshot, place, staging, roots)) for place in origin.candidates(source)]


def staged_items(
    items: Sequence[WorkItem], version: FileVersion, store: ProgressStore, origin: Origin | None = None
) -> None:
    """Make sure every item's local copy is on this node: the snapshot, or the archive's
    entries extracted again from it (the same paths: extraction is deterministic)."""
    missing = [item for item in items if not Path(item.local_path).is_file()]
    if not missing:
        return
    snap = staged_snapshot(version, store, origin)
    if all(item.local_path == version.snapshot_path for item in missing):
        return
    detection = detect(snap, version.source.name)
    extract(snap, detection.kind, private_work_dir(staging_root(version), version.sha256) / "extracted")
    log.info(
        "%s: archive extracted again (its entries were not on this node)",
        version.source.relative_path,
        extra={"fields": {"fileId": version.file_id}},
    )


# ---- step 2: type_detection -------------------------------------------------------------------


def detect_type(
    version: FileVersion, store: ProgressStore, claimant: Claimant, origin: Origin | None = None
) -> Detection:
    claimant.hold(store, version.file_id, version.sha256)
    detection = detect(staged_snapshot(version, store, origin), version.source.name)
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
    version: FileVersion,
    detection: Detection,
    staging: Path,
    store: ProgressStore,
    claimant: Claimant,
    origin: Origin | None = None,
) -> list[WorkItem]:
    """The file itself, or every entry of an archive, each with its own detected type.

    An entry keeps the archive's inner structure below a folder named after the archive.
    Archives inside archives are uploaded as they are, not unpacked again (a bound on
    work and on nesting attacks).
    """
    claimant.hold(store, version.file_id, version.sha256)
    snap = staged_snapshot(version, store, origin)
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
    dest = private_work_dir(staging, version.sha256) / "extracted"
    entries = extract(snap, detection.kind, dest)
    items: list[WorkItem] = []
    for entry in entries:
        rel = join_key(version.source.relative_path, entry.relative_path)
        # an entry lives below its archive's own folder; below that, the source rules hold
        check_canonical(rel, f"{version.source.name}: entry")
        check_not_nested(rel, first_folder=len(PurePosixPath(version.source.relative_path).parts))
        try:
            entry_detection = detect(entry.path, PurePosixPath(entry.relative_path).name)
        except UnsupportedFileError as exc:
            raise UnsupportedFileError(f"{version.source.name}: entry {entry.relative_path}: {exc}") from None
        if entry_detection.file_type is FileType.ARCHIVE:
            entry_detection = Detection(
                FileType.REGULAR, "regular", entry_detection.extension, entry_detection.content_type
            )
        file_id, entry_version = _claim_entry(
            store, claimant, version, rel, entry.relative_path, entry.path, entry_detection
        )
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
    origin: Origin | None = None,
    client: Any = None,
    bucket: str = "",
    on_landed: Callable[[UploadedObject], None] | None = None,
) -> list[PreparedItem]:
    """Tabular items become Parquet chunks (one pass each, validated in the same pass
    when a rule set selects them); other items pass through.

    A finished conversion is kept next to its `_done.json`, so a re-executed step reuses
    it instead of converting again. The chunk plan belongs to this version: chunks that
    landed for an earlier version of the file are never taken for this one's.

    With a `client`, each chunk lands in S3 as soon as it is whole (`transfer.ahead`):
    recorded, sent and reported to `on_landed` exactly as the upload step would, while
    the pass goes on, so a big file's upload overlaps its conversion. The upload step
    sends the rest (the last chunk, and any whose landing failed).
    """
    claimant.hold(store, version.file_id, version.sha256)
    recipe = ConversionRecipe(chunk_size, compression, rules_dir, as_of or as_of_date(None), tuple(csv_null_strings))
    prepared: list[PreparedItem] = []
    for item in items:
        key = join_key(prefix, item.relative_path)
        # Known before anything is written, so crash recovery can find partial output.
        store.update_file(item.file_id, output_key=key)
        if item.kind not in TABULAR_KINDS:
            prepared.append(PreparedItem(item, key))
            continue
        done = parquet_dir(staging, version, item) / "_done.json"
        sent_ahead: frozenset[int] = frozenset()
        if done.exists():
            conversion = ConversionResult.from_json(done.read_text())
        else:
            staged_items([item], version, store, origin)
            target = PreparedItem(item, key, compression=compression)
            ahead = _upload_ahead(target, chunk_size, store, client, bucket, on_landed)
            conversion = _convert(item, parquet_dir(staging, version, item), recipe, ahead)
            sent_ahead = ahead.landed() if ahead else frozenset()
        store.plan_chunks(item.file_id, conversion.record_count, chunk_size, version=item.version)
        skipped = conversion.skipped_rules
        fields: dict[str, Any] = {"content_type": item.content_type, "file_type": item.file_type}
        if skipped:
            # Not a failure: the rule set said to skip rules a file lacks columns for. Recorded
            # beside the counts, as how many records each rule was not evaluated on.
            summary = store.require(item.file_id).error_summary
            fields["error_summary"] = {**summary, "skippedRules": dict.fromkeys(skipped, conversion.record_count)}
            log.warning(
                "%s: rules skipped: %s",
                item.relative_path,
                "; ".join(f"{r} ({why})" for r, why in skipped.items()),
                extra={"fields": {"fileId": item.file_id}},
            )
        store.update_file(item.file_id, **fields)
        count, chunks = conversion.record_count, tuple(conversion.chunks)
        landed_in = claimant.run_id if sent_ahead else ""
        prepared.append(
            PreparedItem(
                item,
                key,
                count,
                compression,
                chunks,
                skipped,
                recipe,
                sent_ahead,
                landed_in,
                conversion.numbers_as_text,
            )
        )
    return prepared


def _upload_ahead(
    target: PreparedItem,
    chunk_size: int,
    store: ProgressStore,
    client: Any,
    bucket: str,
    on_landed: Callable[[UploadedObject], None] | None,
) -> UploadAhead | None:
    """Chunks landing while `target` converts, unless there is no client or chunks of this
    version are recorded already (a conversion run again on a node without the chunk
    files: its chunks may be COMPLETED, and a failed conversion must not undo those)."""
    item = target.item
    if client is None:
        return None
    recorded = store.list_chunks(item.file_id)
    if any(c.version == item.version for c in recorded):
        return None
    if recorded:
        store.plan_chunks(item.file_id, 0, chunk_size, version=item.version)  # an older version's plan goes

    def land(chunk: ChunkFile) -> None:
        record = store.plan_chunk(item.file_id, chunk.chunk_index, chunk_size, item.version)
        landed = _upload_chunk(
            target, chunk, records={chunk.chunk_index: record}, client=client, bucket=bucket, store=store
        )
        if on_landed is not None:
            on_landed(landed)

    def undo(chunks: list[ChunkFile]) -> None:
        keys = [target.part_key(c) for c in chunks] + [target.part_key(c, rejected=True) for c in chunks]
        with contextlib.suppress(Exception):  # best effort: crash recovery and the next commit sweep too
            delete_keys(client, bucket, keys)
        store.plan_chunks(item.file_id, 0, chunk_size, version=item.version)

    return UploadAhead(land, undo)


def parquet_dir(staging: Path, version: FileVersion, item: WorkItem) -> Path:
    """The item's conversion folder, in its version's work folder (made private if missing)."""
    return private_work_dir(staging, version.sha256) / "parquet" / make_file_id(item.relative_path)


def _convert(
    item: WorkItem, out_dir: Path, recipe: ConversionRecipe, ahead: UploadAhead | None = None
) -> ConversionResult:
    """One conversion pass into `out_dir`, its result kept beside the parts (`_done.json`);
    with `ahead`, each whole chunk lands while the pass goes on."""
    rule_set = rule_set_for(item.relative_path, recipe.rules_dir) if recipe.rules_dir else None
    try:
        conversion = convert_to_parquet_chunks(
            Path(item.local_path),
            item.kind,
            out_dir,
            recipe.chunk_size,
            recipe.compression,
            rules=rule_set.render(recipe.as_of or as_of_date(None)) if rule_set else None,
            required_columns=rule_set.columns if rule_set else (),
            on_missing_columns=rule_set.on_missing_columns if rule_set else "skip_rules",
            csv_null_strings=recipe.csv_null_strings,
            sink=ahead,
        )
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # a failed pass leaves no partial parts
        if ahead:
            ahead.discard()  # ... locally nor in S3
        raise
    (out_dir / "_done.json").write_text(conversion.to_json())
    for column, words in conversion.numbers_as_text.items():
        log.warning(
            "%s: column %s landed as text, its values are numbers but for %s (CSV_NULL_STRINGS reads those as NULL)",
            item.relative_path,
            column,
            ", ".join(map(repr, words)),
            extra={"fields": {"fileId": item.file_id}},
        )
    log.info(
        "%s: %d records in %d chunks (%.2fs)",
        item.relative_path,
        conversion.record_count,
        len(conversion.chunks),
        conversion.duration_s,
        extra={"fields": {"fileId": item.file_id, "compression": recipe.compression}},
    )
    return conversion


def _chunks_on_disk(chunk: ChunkFile) -> bool:
    return Path(chunk.path).is_file() and (chunk.rejected_path is None or Path(chunk.rejected_path).is_file())


def _restage_chunks(
    item: PreparedItem,
    version: FileVersion,
    records: dict[int, ChunkStatus],
    client: Any,
    bucket: str,
    store: ProgressStore,
    origin: Origin | None,
) -> PreparedItem:
    """The item with its chunk files on this node, converted again from the snapshot when
    a chunk still to upload is missing. Chunks COMPLETED and verified in S3 are not needed
    (they are never sent again), so a node that lacks only those converts nothing."""
    missing = [c for c in item.chunks if not _chunks_on_disk(c)]
    if all(_already_uploaded(item, c, records[c.chunk_index], client, bucket) for c in missing):
        return item
    if item.recipe is None:
        raise ConversionError(f"{item.item.relative_path}: chunk files missing and no recipe to convert them again")
    staged_items([item.item], version, store, origin)
    conversion = _convert(item.item, parquet_dir(staging_root(version), version, item.item), item.recipe)
    bounds = [(c.chunk_index, c.start_offset, c.end_offset) for c in item.chunks]
    if [(c.chunk_index, c.start_offset, c.end_offset) for c in conversion.chunks] != bounds:
        raise ConversionError(
            f"{item.item.relative_path}: converting again gave other chunk boundaries than the first conversion"
        )
    return dataclasses.replace(item, chunks=tuple(conversion.chunks))


# ---- step 5: streaming (S3 upload) ------------------------------------------------------------------


def _already_uploaded(
    item: PreparedItem, chunk: ChunkFile, record: ChunkStatus, client: Any, bucket: str, trust_record: bool = False
) -> bool:
    """A chunk of this very version, COMPLETED, whose objects are still in S3 with the
    recorded checksums, needs no upload. `trust_record` spares the HEADs for a chunk that
    this very run landed and verified moments ago (the verification step checks it again)."""
    key = item.part_key(chunk)
    if record.status is not ProcessingStatus.COMPLETED or record.version != item.item.version or record.s3_key != key:
        return False
    rejected = record.rejected
    if chunk.rejected_path and (rejected is None or rejected.s3_key != item.part_key(chunk, rejected=True)):
        return False
    if trust_record:
        return True
    if not object_matches(client, bucket, key, record.size_bytes or 0, record.sha256 or ""):
        return False
    return rejected is None or object_matches(client, bucket, rejected.s3_key, rejected.size_bytes, rejected.sha256)


def upload_items(
    prepared: list[PreparedItem],
    version: FileVersion,
    client: Any,
    bucket: str,
    store: ProgressStore,
    claimant: Claimant,
    threads: int = UPLOAD_THREADS,
    origin: Origin | None = None,
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
            staged_items([item.item], version, store, origin or Origin(client))
            yield _upload_plain(item, version, client, bucket, store)
            continue
        records = {c.chunk_index: c for c in store.list_chunks(item.item.file_id)}
        on_disk = _restage_chunks(item, version, records, client, bucket, store, origin or Origin(client))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="upload") as pool:
            upload = partial(
                _upload_chunk, on_disk, records=records, client=client, bucket=bucket, store=store, run=claimant.run_id
            )
            yield from pool.map(upload, on_disk.chunks)


def _upload_chunk(
    item: PreparedItem,
    chunk: ChunkFile,
    *,
    records: dict[int, ChunkStatus],
    client: Any,
    bucket: str,
    store: ProgressStore,
    run: str = "",
) -> UploadedObject:
    current = records[chunk.chunk_index]
    # landed by this very run's conversion, which reported it; a re-execution reports it again
    ahead = chunk.chunk_index in item.sent_ahead and item.landed_in_run == run != ""
    key, file_id = item.part_key(chunk), item.item.file_id
    landed = partial(
        UploadedObject,
        file_id=file_id,
        relative_path=item.item.relative_path,
        key=key,
        chunk=chunk,
        compression=item.compression,
    )
    if _already_uploaded(item, chunk, current, client, bucket, trust_record=ahead):
        return landed(
            size=current.size_bytes or 0,
            sha256=current.sha256 or "",
            duration_s=current.duration or 0.0,
            reused=True,
            ahead=ahead,
        )
    store.chunk_started(item.chunk_id(chunk), worker_name())
    started = time.monotonic()
    rejected = None
    send = partial(upload_file, client, bucket, content_type=PARQUET_TYPE, journal=store, file_id=file_id)
    try:
        result = send(key, chunk.path, metadata={"x-completed": "true", "x-file-id": file_id})
        if chunk.rejected_path:
            sent = send(
                item.part_key(chunk, rejected=True),
                chunk.rejected_path,
                metadata={"x-completed": "true", "x-file-id": file_id, "x-rejected": "true"},
            )
            verify_object(client, bucket, sent.key, sent.size, sent.sha256)
            rejected = RejectedPart(
                s3_key=sent.key, size_bytes=sent.size, sha256=sent.sha256, records=chunk.failed_records
            )
    except Exception as exc:
        store.chunk_failed(item.chunk_id(chunk), f"{type(exc).__name__}: {exc}", error_kind="s3UploadFailure")
        raise
    duration = time.monotonic() - started
    log.debug(  # debug: each chunk already has its asset materialization in the run
        "%s: chunk %d uploaded (%d bytes, %.2fs)",
        item.item.relative_path,
        chunk.chunk_index,
        result.size,
        duration,
        extra={"fields": {"chunkId": item.chunk_id(chunk), "s3Key": key, "sha256": result.sha256}},
    )
    store.chunk_completed(
        item.chunk_id(chunk),
        s3_key=key,
        size_bytes=result.size,
        sha256=result.sha256,
        duration=duration,
        successful_records=chunk.record_count - chunk.failed_records,
        failed_records=chunk.failed_records,
        validation_errors=chunk.rule_counts,
        rejected=rejected,
    )
    return landed(size=result.size, sha256=result.sha256, duration_s=duration, reused=False)


def _upload_plain(
    item: PreparedItem, version: FileVersion, client: Any, bucket: str, store: ProgressStore
) -> UploadedObject:
    started = time.monotonic()
    known = version.sha256 if item.item.file_id == version.file_id else None
    result = upload_file(
        client,
        bucket,
        item.key,
        Path(item.item.local_path),
        content_type=item.item.content_type,
        metadata={"x-completed": "true", "x-file-id": item.item.file_id},
        journal=store,
        file_id=item.item.file_id,
        sha256=known,
    )
    if result.parts_sent < result.parts:
        log.info(
            "%s: resumed a multipart upload, %d of %d parts were already in S3",
            item.item.relative_path,
            result.parts - result.parts_sent,
            result.parts,
            extra={"fields": {"fileId": item.item.file_id, "s3Key": item.key}},
        )
    return UploadedObject(
        file_id=item.item.file_id,
        relative_path=item.item.relative_path,
        key=item.key,
        size=result.size,
        sha256=result.sha256,
        duration_s=time.monotonic() - started,
        reused=False,
    )


# ---- step 6: integrity_verification --------------------------------------------------------------


def verify_items(
    prepared: list[PreparedItem],
    version: FileVersion,
    client: Any,
    bucket: str,
    store: ProgressStore,
    claimant: Claimant,
    origin: Origin | None = None,
    threads: int = UPLOAD_THREADS,
) -> list[manifests.Manifest]:
    """Check every object against the store (size, SHA-256), then commit each dataset:
    the manifest is swapped in last and the previous version's objects go after it, so a
    reader never sees a partial dataset or two versions at once."""
    claimant.hold(store, version.file_id, version.sha256)
    committed = []
    for item in prepared:
        if not item.is_dataset:
            staged_items([item.item], version, store, origin or Origin(client))
            local = Path(item.item.local_path)
            known = version.sha256 if item.item.file_id == version.file_id else sha256_file(local)
            verify_object(client, bucket, item.key, local.stat().st_size, known)
            continue
        chunks = [c for c in store.list_chunks(item.item.file_id) if c.version == item.item.version]
        parts = [(c.s3_key or "", c.size_bytes or 0, c.sha256 or "") for c in chunks]
        parts += [(c.rejected.s3_key, c.rejected.size_bytes, c.rejected.sha256) for c in chunks if c.rejected]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify") as pool:
            # one HEAD each: a few ms of latency apiece, 400 of them for a 1 GB CSV
            list(pool.map(lambda part: verify_object(client, bucket, *part), parts))
        # the record's checksum is the version: an archive entry's reads `<archive sha>:<path>`
        manifest = manifests.build(item.key, item.item.version, item.record_count or 0, item.compression or "", chunks)
        removed = manifests.commit(client, bucket, manifest)
        if removed:
            log.info(
                "%s: committed version %s, %d object(s) of earlier versions removed",
                item.item.relative_path,
                manifest.file_sha256[:12],
                removed,
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
            entry = claimant.hold(store, item.item.file_id, item.item.version)
            # the entry's size as recorded when it was claimed: its extracted copy may be on another node
            store.complete(item.item.file_id, item.key, processed_bytes=entry.file_size, run_id=claimant.run_id)
    own = [p.key for p in prepared if p.item.file_id == version.file_id]
    output_key = own[0] if own else join_key(prefix, version.source.relative_path)
    done = store.complete(version.file_id, output_key, processed_bytes=version.size, run_id=claimant.run_id)
    if staging is not None:
        staging_area.release(staging, version.sha256, staging_area.versions_in_use(store))
    return done


# ---- after the last retry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GaveUp:
    """What giving up on a file did: which records went FAILED, where the original went."""

    failed: tuple[str, ...]
    parked: Path | None = None
    park_error: str | None = None


def give_up(
    store: ProgressStore,
    client: Any,
    run_id: str,
    file_id: str | None,
    source: str | None,
    reason: str,
    watch: Path,
    error_dir: Path,
) -> GaveUp:
    """A run failed for good: record FAILED, give up its uploads, park the original.

    Only what this run holds is touched: a run that failed because another run holds the
    file, or because a newer version superseded its own, leaves that file alone. A file
    that failed before it could be recorded (unreadable, a bad sidecar) is recorded now.
    When the original cannot be parked, it stays where it is and its record says why.
    """
    if file_id and source and store.get(file_id) is None:
        store.record_detected(FileStatus(file_id=file_id, file_path=source, file_name=PurePosixPath(source).name))
        store.start(file_id, run_id)
    held = [
        r
        for r in store.list_files(ProcessingStatus.IN_PROGRESS)
        if r.run_id == run_id and (r.file_id == file_id or r.metadata.get("archiveFileId") == file_id)
    ]
    for record in held:
        store.fail(record.file_id, reason, run_id=run_id)
        for task in store.list_upload_tasks(record.file_id):
            abort_upload(client, task, store)  # if S3 is down, the sweep tries again later
    main = next((r for r in held if r.file_id == file_id), None)
    failed = tuple(r.file_id for r in held)
    if main is None or "://" in main.file_path or not is_regular(main.file_path):
        return GaveUp(failed)
    if lexically_below(main.file_path, watch) is None:
        why = f"it is not under WATCH_PATH, so it stays at {main.file_path}"
        store.update_file(main.file_id, error_details=f"{reason}; {why}")
        return GaveUp(failed, None, why)
    if not _holds_version(Path(main.file_path), main, watch):
        why = f"the original changed since the run started and stays at {main.file_path} for its new version's run"
        store.update_file(main.file_id, error_details=f"{reason}; {why}")
        return GaveUp(failed, None, why)
    note = {"fileId": file_id, "filePath": main.file_path, "error": reason, "runId": run_id}
    try:
        return GaveUp(failed, parking.park(Path(main.file_path), watch, error_dir, note))
    except UnsafeSourceError as exc:
        store.update_file(main.file_id, error_details=f"{reason}; {exc}")
        return GaveUp(failed, None, str(exc))
    except OSError as exc:
        why = (
            f"the original could not be moved to ERROR_DIRECTORY ({type(exc).__name__}: {exc.strerror or exc}) "
            f"and is still at {main.file_path}"
        )
        store.update_file(main.file_id, error_details=f"{reason}; {why}")
        return GaveUp(failed, None, why)


def _holds_version(original: Path, record: FileStatus, watch: Path) -> bool:
    """Whether the original still has the bytes of the version that failed. Only that
    version is parked: a file replaced meanwhile (a fix, or new data) is a new version,
    which its own run processes, so it stays in the watched directory."""
    if not record.checksum:
        return True  # failed before it was recorded: what is there is what failed
    try:
        with open_regular(original, (watch,)) as readable:
            if record.file_size is not None and os.fstat(readable.fileno()).st_size != record.file_size:
                return False
            return sha256_stream(readable) == record.checksum
    except UnsupportedFileError:
        return False  # swapped for a link or a FIFO: not the bytes that failed
    except OSError:
        return True  # unreadable now: it cannot be told apart, so it is parked as before
