"""Step 1, checksum_calculation: the file into staging and its SHA-256, in one read; then the claim.

Every later step reads the snapshot, never the original, so the original can change or
move to the error directory without breaking a retry; and the claim makes this run the
one that works on this version of the file.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from s3proc_dagster.errors import FileBusy
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.checksum import Snapshot, snapshot
from s3proc_dagster.logs import about, progress_logger
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.pipeline.cache import snapshot_object
from s3proc_dagster.pipeline.context import StepContext
from s3proc_dagster.pipeline.records import FileVersion
from s3proc_dagster.sources.resolve import Source
from s3proc_dagster.stores.base import ClaimOutcome

progress = progress_logger("pipeline")

_CLAIMED = {
    ClaimOutcome.CLAIMED: "snapshot taken",
    ClaimOutcome.UNCHANGED: "unchanged, skipped",
    ClaimOutcome.BUSY: "already being processed by run {holder}, skipped",
}


def take_snapshot(ctx: StepContext, source: Source, max_bytes: int | None = None) -> FileVersion:
    """Copy the file (or stream the object) into staging and hash it in one read, then
    claim this version. A local file is read without following links out of its root."""
    if source.is_object:
        snap = snapshot_object(ctx.client, source.bucket or "", source.key or "", ctx.staging, max_bytes)
    else:
        snap = snapshot(Path(source.uri), ctx.staging, source.roots, max_bytes)
    return record_version(ctx, source, snap)


def record_version(ctx: StepContext, source: Source, snap: Snapshot) -> FileVersion:
    """Claim a snapshot as the file version this run processes.

    An unchanged COMPLETED version comes back UNCHANGED, and the same version held by
    another live run BUSY: either way nothing is done twice, and the snapshot just taken
    goes again (unless that other run uses it). Another version held by a live run raises
    FileBusy, a transient error: this run retries once that one is done.
    """
    claim = ctx.store.claim(
        FileStatus(
            file_id=source.file_id,
            file_path=source.uri,
            file_name=source.name,
            checksum=snap.sha256,
            file_size=snap.size,
            source_bucket=source.bucket,
            source_key=source.key,
            metadata=source.metadata,
        ),
        ctx.claimant.run_id,
        ctx.claimant.is_alive,
    )
    if claim.outcome is ClaimOutcome.BUSY and claim.record.checksum != snap.sha256:
        raise FileBusy(
            f"{source.relative_path}: run {claim.holder} is processing an earlier version; this version waits for it",
            claim.holder or "",
        )
    progress.info(
        "%s: %s",
        source.relative_path,
        _CLAIMED[claim.outcome].format(holder=claim.holder),
        extra=about(claim.record.file_id, sha256=snap.sha256, bytes=snap.size),
    )
    if claim.outcome is not ClaimOutcome.CLAIMED:
        staging_area.release(ctx.staging, snap.sha256, staging_area.versions_in_use(ctx.store))
    return FileVersion(
        claim.record.file_id, source, str(snap.path), snap.sha256, snap.size, claim.outcome, claim.holder
    )


def held_version(ctx: StepContext, source: Source) -> FileVersion | None:
    """The version this very run claimed in an earlier attempt of the step, if its snapshot
    is still staged: a retried step goes on from there instead of reading the file again."""
    record = ctx.store.get(source.file_id)
    if record is None or record.status is not ProcessingStatus.IN_PROGRESS or not record.checksum:
        return None
    if record.run_id != ctx.claimant.run_id:
        return None
    path = ctx.staging / record.checksum / source.name
    if not path.is_file():
        return None
    return FileVersion(record.file_id, source, str(path), record.checksum, record.file_size or path.stat().st_size)


def settled_since(ctx: StepContext, file_id: str, since: datetime) -> FileStatus | None:
    """The file's record if another run settled it (COMPLETED or FAILED) after `since`, when
    this run was requested: a file two requests raced for (a backfill and the sensor's
    requeue of the same retried file) is then gone from its path for the later run, which
    skips it rather than fail on a file that is parked, moved or done."""
    record = ctx.store.get(file_id)
    if record is None or record.run_id in (None, ctx.claimant.run_id):
        return None
    settled = record.status in (ProcessingStatus.COMPLETED, ProcessingStatus.FAILED)
    updated = record.last_updated_at if record.last_updated_at.tzinfo else record.last_updated_at.replace(tzinfo=UTC)
    return record if settled and updated >= since else None
