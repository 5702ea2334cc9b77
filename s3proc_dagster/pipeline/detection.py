"""Steps 2 and 3, type_detection and archive_extraction: what the file is, and what to upload of it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from s3proc_dagster.errors import FileBusy, UnsupportedFileError
from s3proc_dagster.files.archives import extract
from s3proc_dagster.files.detect import Detection, detect
from s3proc_dagster.files.staging import private_work_dir
from s3proc_dagster.models import ARCHIVE_FILE_ID, FileStatus, FileType, make_file_id
from s3proc_dagster.pipeline.cache import staged_snapshot
from s3proc_dagster.pipeline.context import StepContext
from s3proc_dagster.pipeline.records import FileVersion, WorkItem
from s3proc_dagster.sources.names import check_canonical, check_not_nested
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR
from s3proc_dagster.stores.base import ClaimOutcome
from s3proc_dagster.transfer.keys import join_key


def detect_type(ctx: StepContext, version: FileVersion) -> Detection:
    """The file's type by its name, confirmed by its first bytes (`files.detect`)."""
    ctx.hold(version.file_id, version.sha256)
    detection = detect(staged_snapshot(ctx, version), version.source.name)
    ctx.store.update_file(version.file_id, file_type=detection.file_type, content_type=detection.content_type)
    return detection


def plan_work(ctx: StepContext, version: FileVersion, detection: Detection) -> list[WorkItem]:
    """The file itself, or every entry of an archive, each with its own detected type.

    An entry keeps the archive's inner structure below a folder named after the archive.
    Archives inside archives are uploaded as they are, not unpacked again (a bound on
    work and on nesting attacks).
    """
    ctx.hold(version.file_id, version.sha256)
    snap = staged_snapshot(ctx, version)
    if detection.file_type is not FileType.ARCHIVE:
        source = version.source
        kind, file_type, content_type = detection.kind, detection.file_type, detection.content_type
        return [
            WorkItem(
                version.file_id,
                source.relative_path,
                version.snapshot_path,
                kind,
                file_type,
                content_type,
                version.sha256,
            )
        ]
    entries = extract(snap, detection.kind, private_work_dir(ctx.staging, version.sha256) / "extracted")
    if not entries:  # as an empty file fails: there is nothing to upload, and the producer should know
        raise UnsupportedFileError(
            f"{version.source.name}: the archive holds no files (only folders or macOS metadata, or nothing)"
        )
    items: list[WorkItem] = []
    for entry in entries:
        rel = join_key(version.source.relative_path, entry.relative_path)
        # an entry lives below its archive's own folder; below that, the source rules hold
        check_canonical(rel, f"{version.source.name}: entry")
        check_not_nested(rel, first_folder=len(PurePosixPath(version.source.relative_path).parts))
        try:
            found = detect(entry.path, PurePosixPath(entry.relative_path).name)
        except UnsupportedFileError as exc:
            raise UnsupportedFileError(f"{version.source.name}: entry {entry.relative_path}: {exc}") from None
        if found.file_type is FileType.ARCHIVE:
            found = Detection(FileType.REGULAR, "regular", found.extension, found.content_type)
        file_id, entry_version = _claim_entry(ctx, version, rel, entry.relative_path, entry.path, found)
        items.append(
            WorkItem(file_id, rel, str(entry.path), found.kind, found.file_type, found.content_type, entry_version)
        )
    return items


def _claim_entry(
    ctx: StepContext, version: FileVersion, rel: str, entry_path: str, local: Path, detection: Detection
) -> tuple[str, str]:
    """Each archive entry gets its own record (own fileId, chunks, status), linked to the
    archive and held by the archive's run; its path reads `<archive>!/<entry path>`, as
    Java and zipfile URLs do. Returns the entry's fileId and version."""
    entry_version = f"{version.sha256}:{rel}"
    claim = ctx.store.claim(
        FileStatus(
            file_id=make_file_id(rel, version.source.zone),
            file_path=f"{version.source.uri}{ENTRY_SEPARATOR}{entry_path}",
            file_name=PurePosixPath(rel).name,
            checksum=entry_version,
            file_size=local.stat().st_size,
            file_type=detection.file_type,
            content_type=detection.content_type,
            metadata={**version.source.metadata, ARCHIVE_FILE_ID: version.file_id},
        ),
        ctx.claimant.run_id,
        ctx.claimant.is_alive,
        reprocess_completed=True,
    )
    if claim.outcome is ClaimOutcome.BUSY:
        raise FileBusy(f"{rel}: run {claim.holder} is processing this entry", claim.holder or "")
    return claim.record.file_id, entry_version
