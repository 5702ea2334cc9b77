"""Crash recovery: settle every file a dead run left IN_PROGRESS, and sweep abandoned uploads.

For each IN_PROGRESS file whose holder is no longer alive (the caller judges liveness):
- a dataset is COMPLETED only if its committed `_manifest.json` names the version the
  store records and every part it lists is in S3 with its size and SHA-256; a plain
  object only if it carries `x-completed` and the recorded `x-sha256`. Anything else,
  an older version's manifest included, is not trusted;
- whatever the outcome, the file's unfinished multipart uploads are aborted, except the
  ones recorded for this very version, which the rerun resumes; and objects that neither
  the committed manifest (what readers see now) nor a COMPLETED chunk of this version
  vouches for are deleted;
- an unfinished file goes back to PENDING, so the watch sensor runs it again;
- first of all, its counters are set from its chunk records (`store.recount`): on a
  MongoDB without transactions the run may have died between a chunk's write and its
  file's counters.

`sweep_uploads` aborts multipart uploads under the product's prefix that no live run
owns and that are older than a bound: uploads left by an S3 outage, a killed run whose
file was never recovered, or a run that gave up while S3 was down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from s3proc_dagster.errors import ConcurrencyConflict, IllegalTransition
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.staging import Swept
from s3proc_dagster.logs import get_logger
from s3proc_dagster.models import FileStatus, FileType, ProcessingStatus, utcnow
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.keys import is_s3_uri, prefix_folder, split_uri
from s3proc_dagster.transfer.manifest import delete_stale_versions, is_intact, read_manifest, version_folder
from s3proc_dagster.transfer.recovery import abort, open_uploads
from s3proc_dagster.transfer.verify import head

log = get_logger("recovery")


@dataclass(frozen=True)
class Recovered:
    file_id: str
    file_path: str
    outcome: ProcessingStatus  # COMPLETED (S3 proves the version whole) or PENDING (to be run again)
    dead_run: str | None = None
    aborted_uploads: int = 0
    deleted_objects: int = 0


def recover(store: ProgressStore, client: Any, bucket: str, is_alive: Callable[[str], bool]) -> list[Recovered]:
    """Settle each IN_PROGRESS file whose holder is not alive, as its record stands once
    that is known.

    A holder that just finished is "not alive" too, and it settled its files (COMPLETED,
    FAILED, or PENDING for a run of their own) after the listing was read; so each file is
    read again after the verdict (a dead holder writes no more) and left alone unless that
    run still holds it. A file another run takes over while it is being settled (a
    re-execution of the dead run, its own rerun) is that run's: the move fails its
    compare-and-set and the file is left to it, instead of failing the whole recovery and
    leaving the other dead runs' files as they were."""
    report: list[Recovered] = []
    for listed in store.list_files(ProcessingStatus.IN_PROGRESS):
        if listed.run_id and is_alive(listed.run_id):
            continue
        status = store.get(listed.file_id)
        if status is None or status.status is not ProcessingStatus.IN_PROGRESS or status.run_id != listed.run_id:
            continue
        try:
            report.append(settle(store, client, bucket, status))
        except (ConcurrencyConflict, IllegalTransition) as exc:  # FileBusy included
            log.info(
                "%s: not settled, it moved on meanwhile (%s)",
                status.file_path,
                exc,
                extra={"fields": {"fileId": status.file_id}},
            )
    return report


def settle(store: ProgressStore, client: Any, bucket: str, status: FileStatus) -> Recovered:
    """Decide one dead run's file: COMPLETED if S3 proves this version whole, else PENDING."""
    store.recount(status.file_id)
    dead, key = status.run_id, status.output_key
    resumable = {
        t.upload_id
        for t in store.list_upload_tasks(status.file_id)
        if t.checksum and _same_content(t.s3_key, key, status)
    }
    aborted = deleted = 0
    complete = False
    if key and status.file_type is FileType.DATABASE:
        committed = read_manifest(client, bucket, key)
        complete = bool(committed and committed.file_sha256 == status.checksum and is_intact(client, bucket, committed))
        keep = committed.vouched_keys() if committed else set()
        if not complete:
            for chunk in store.list_chunks(status.file_id):
                if chunk.status is ProcessingStatus.COMPLETED and chunk.version == status.checksum and chunk.s3_key:
                    keep.add(chunk.s3_key)
                    if chunk.rejected:
                        keep.add(chunk.rejected.s3_key)
        aborted = _abort_uploads(store, client, bucket, key + "/", set() if complete else resumable)
        deleted = delete_stale_versions(client, bucket, key, keep=keep)
    elif key and status.file_type is FileType.REGULAR:
        found = head(client, bucket, key)
        meta = (found or {}).get("Metadata", {})
        complete = meta.get("x-completed") == "true" and meta.get("x-sha256") == status.checksum
        aborted = _abort_uploads(store, client, bucket, key, set() if complete else resumable, exact=True)
    if complete:
        store.complete(status.file_id, key or "", run_id=dead)
        outcome = ProcessingStatus.COMPLETED
    else:
        store.reset_to_pending(status.file_id, "crash recovery: the run that was processing it is gone", run_id=dead)
        outcome = ProcessingStatus.PENDING
    log.info(
        "%s: %s after run %s died (aborted %d uploads, deleted %d objects)",
        status.file_path,
        outcome.name,
        dead,
        aborted,
        deleted,
        extra={"fields": {"fileId": status.file_id}},
    )
    return Recovered(status.file_id, status.file_path, outcome, dead, aborted, deleted)


def requeue_abandoned(store: ProgressStore, file_id: str, source: str, run_id: str, run_started: float) -> bool:
    """Make sure the sensors run again a file whose run died before it claimed the file
    (killed during start-up or while taking its snapshot); True if it was set PENDING.

    A file IN_PROGRESS is `recover`'s; one changed since the dead run started was taken
    care of by a later run.
    """
    record = store.get(file_id)
    reason = f"crash recovery: run {run_id} died before it could process this file"
    if record is None:
        bucket, key = split_uri(source) if is_s3_uri(source) else ("", "")
        record, _ = store.record_detected(
            FileStatus(
                file_id=file_id,
                file_path=source,
                file_name=source.rstrip("/").rsplit("/", 1)[-1],
                source_bucket=bucket or None,
                source_key=key or None,
            )
        )
    elif record.status is ProcessingStatus.IN_PROGRESS or record.last_updated_at.timestamp() > run_started:
        return False
    if record.status is ProcessingStatus.PENDING:
        if record.processing_started_at is not None:
            return False  # already waiting for a rerun
        store.start(file_id, run_id)
    store.reset_to_pending(file_id, reason)
    return True


def _same_content(task_key: str, output_key: str | None, status: FileStatus) -> bool:
    """A recorded upload worth resuming: this version's bytes for this file's output."""
    if not output_key:
        return False
    if status.file_type is FileType.REGULAR:
        return task_key == output_key
    return task_key.startswith(f"{output_key}/{version_folder(status.checksum or '')}/")


def _abort_uploads(
    store: ProgressStore, client: Any, bucket: str, prefix: str, keep: set[str | None], exact: bool = False
) -> int:
    tasks = {t.upload_id: t for t in store.list_upload_tasks() if t.bucket == bucket}
    aborted = 0
    for upload in open_uploads(client, bucket, prefix):
        if (exact and upload["Key"] != prefix) or upload["UploadId"] in keep:
            continue
        abort(client, bucket, upload["Key"], upload["UploadId"])
        if upload["UploadId"] in tasks:
            store.delete_upload_task(tasks[upload["UploadId"]].id)
        aborted += 1
    return aborted


def sweep_uploads(
    store: ProgressStore,
    client: Any,
    bucket: str,
    prefix: str,
    older_than: datetime,
    is_alive: Callable[[str], bool],
    exclude_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """Abort unfinished uploads under `prefix` started before `older_than` that no live
    run owns; return their keys. `exclude_prefixes` holds the S3 incoming prefix: uploads
    users are making into it are theirs, never ours to abort."""
    tasks = {t.upload_id: t for t in store.list_upload_tasks() if t.bucket == bucket}
    aborted = []
    for upload in open_uploads(client, bucket, prefix_folder(prefix)):
        if any(upload["Key"].startswith(p) for p in exclude_prefixes if p) or upload["Initiated"] >= older_than:
            continue
        task = tasks.get(upload["UploadId"])
        owner = store.get(task.file_id) if task and task.file_id else None
        if owner and owner.status is ProcessingStatus.IN_PROGRESS and owner.run_id and is_alive(owner.run_id):
            continue
        abort(client, bucket, upload["Key"], upload["UploadId"])
        if task:
            store.delete_upload_task(task.id)
        aborted.append(upload["Key"])
    live = {u["UploadId"] for u in open_uploads(client, bucket, prefix_folder(prefix))}
    for task in tasks.values():  # records of uploads S3 no longer has (completed or aborted elsewhere)
        if task.upload_id not in live and task.updated_at < older_than:
            store.delete_upload_task(task.id)
    return aborted


@dataclass(frozen=True)
class DeadRun:
    """A run whose worker is gone, as the orchestrator reported it; `file_id`/`source` name
    the file it was started for, if it was a file's run."""

    run_id: str
    started: float
    file_id: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Reconciled:
    requeued: list[str]  # files whose run died before claiming them, PENDING again
    settled: list[Recovered]  # files a dead run held
    aborted_uploads: list[str]
    staging: Swept


def reconcile(
    store: ProgressStore,
    client: Any,
    bucket: str,
    prefix: str,
    is_alive: Callable[[str], bool],
    dead_runs: list[DeadRun],
    staging: Path,
    stale_upload_age_s: float,
    staging_older_than_s: float,
    exclude_prefixes: tuple[str, ...] = (),
) -> Reconciled:
    """Everything crash recovery does, in order: files of runs that died early go back to
    PENDING, files dead runs held are settled, abandoned uploads are aborted, and staging
    no file needs is removed."""
    requeued = [
        run.source
        for run in dead_runs
        if run.file_id and run.source and requeue_abandoned(store, run.file_id, run.source, run.run_id, run.started)
    ]
    settled = recover(store, client, bucket, is_alive)
    stale_before = utcnow() - timedelta(seconds=stale_upload_age_s)
    aborted = sweep_uploads(store, client, bucket, prefix, stale_before, is_alive, exclude_prefixes)
    in_use = staging_area.versions_in_use(store)
    return Reconciled(requeued, settled, aborted, staging_area.sweep(staging, in_use, staging_older_than_s))
