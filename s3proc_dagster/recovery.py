"""Crash recovery (seed 001): settle every IN_PROGRESS record left by a dead run.

For each IN_PROGRESS file whose run is no longer alive:
- its output has a completion marker (a dataset's `_manifest.json`, or an object with
  `x-completed: true`): it finished but the process died before saying so -> COMPLETED;
- otherwise: unfinished multipart uploads under its key are aborted, objects that no
  COMPLETED chunk record vouches for are deleted, and it goes back to PENDING, so the
  watch sensor runs it again (under a new run key).
Chunks a verified record vouches for are kept, so the new run does not upload them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from s3proc_dagster.models import FileStatus, FileType, ProcessingStatus
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.recovery import abort_stale_uploads, delete_prefix, has_completion_marker

S = ProcessingStatus


@dataclass(frozen=True)
class Recovered:
    file_id: str
    file_path: str
    outcome: str  # "completed" | "pending"
    aborted_uploads: int = 0
    deleted_objects: int = 0


def _marker_key(status: FileStatus) -> str | None:
    if not status.output_key:
        return None
    if status.file_type is FileType.DATABASE:
        return f"{status.output_key}/_manifest.json"
    if status.file_type is FileType.REGULAR:
        return status.output_key
    return None  # an archive is complete only when its run says so


def recover(
    store: ProgressStore,
    client: Any,
    bucket: str,
    is_running: Callable[[str], bool],
) -> list[Recovered]:
    report: list[Recovered] = []
    for status in store.list_files(S.IN_PROGRESS):
        if is_running(status.file_id) or is_running(status.metadata.get("archiveFileId", "")):
            continue
        marker = _marker_key(status)
        if marker and has_completion_marker(client, bucket, marker):
            store.complete(status.file_id, status.output_key or marker)
            report.append(Recovered(status.file_id, status.file_path, "completed"))
            continue
        aborted = deleted = 0
        if status.output_key:
            keep = {
                c.s3_key
                for c in store.list_chunks(status.file_id)
                if c.status is S.COMPLETED and c.s3_key
            }
            prefix = status.output_key if status.file_type is FileType.REGULAR else status.output_key + "/"
            aborted = len(abort_stale_uploads(client, bucket, prefix))
            deleted = delete_prefix(client, bucket, prefix, keep=keep)
        store.reset_to_pending(status.file_id, "crash recovery: the run that was processing it is gone")
        report.append(Recovered(status.file_id, status.file_path, "pending", aborted, deleted))
    return report
