"""After the last retry: the file FAILED with its reason, its uploads given up, the original parked.

Only what the failed run holds is touched: a run that failed because another run holds
the file, or because a newer version superseded its own, leaves that file alone. When
the original cannot be parked, it stays where it is and its record says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from s3proc_dagster.errors import UnsafeSourceError, UnsupportedFileError
from s3proc_dagster.files import parking
from s3proc_dagster.files.checksum import sha256_stream
from s3proc_dagster.models import ARCHIVE_FILE_ID, FileStatus, ProcessingStatus
from s3proc_dagster.sources.confined import is_regular, lexically_below, open_regular
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.keys import is_s3_uri
from s3proc_dagster.transfer.upload import abort_upload


@dataclass(frozen=True)
class GaveUp:
    """What giving up on a file did: which records went FAILED, where the original went."""

    failed: tuple[str, ...]
    parked: Path | None = None
    park_error: str | None = None


def record_if_missing(store: ProgressStore, run_id: str, file_id: str, source: str) -> None:
    """A file that failed before it was recorded (unreadable, a bad sidecar, a refused name)
    is recorded now, as started by the run, so that what happens to it next is on record.
    One PENDING since a run let it go (a batch it left) that fails again before this run
    could claim it is taken by this run the same way: it stayed PENDING for good, its
    requeue's run key spent, and no run ever came for it again."""
    record = store.get(file_id)
    if record is None:
        store.record_detected(FileStatus(file_id=file_id, file_path=source, file_name=PurePosixPath(source).name))
        store.start(file_id, run_id)
    elif record.status is ProcessingStatus.PENDING:
        store.start(file_id, run_id)


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
    """Record FAILED what run `run_id` holds of the file (an archive's entries too), abort
    its uploads, and park the original."""
    if file_id and source:
        record_if_missing(store, run_id, file_id, source)
    held = [
        r
        for r in store.list_files(ProcessingStatus.IN_PROGRESS)
        if r.run_id == run_id and (r.file_id == file_id or r.metadata.get(ARCHIVE_FILE_ID) == file_id)
    ]
    for record in held:  # an entry fails with its archive: said so, whichever entry broke it
        why = (
            reason if record.file_id == file_id else f"its archive {PurePosixPath(source or '').name} failed: {reason}"
        )
        store.fail(record.file_id, why, run_id=run_id)
        for task in store.list_upload_tasks(record.file_id):
            abort_upload(client, task, store)  # if S3 is down, the sweep tries again later
    failed = tuple(r.file_id for r in held)
    main = next((r for r in held if r.file_id == file_id), None)
    if main is None or is_s3_uri(main.file_path) or not is_regular(main.file_path):
        return GaveUp(failed)
    parked, why = _park(main, reason, run_id, watch, error_dir)
    if why is not None:
        store.update_file(main.file_id, error_details=f"{reason}; {why}")
    return GaveUp(failed, parked, why)


def _park(record: FileStatus, reason: str, run_id: str, watch: Path, error_dir: Path) -> tuple[Path | None, str | None]:
    """(where the original went, or why it stays): only the version that failed, and only
    from below WATCH_PATH, is moved."""
    if lexically_below(record.file_path, watch) is None:
        return None, f"it is not under WATCH_PATH, so it stays at {record.file_path}"
    if not _holds_version(Path(record.file_path), record, watch):
        return (
            None,
            f"the original changed since the run started and stays at {record.file_path} for its new version's run",
        )
    note = {"fileId": record.file_id, "filePath": record.file_path, "error": reason, "runId": run_id}
    try:
        return parking.park(Path(record.file_path), watch, error_dir, note), None
    except UnsafeSourceError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, (
            f"the original could not be moved to ERROR_DIRECTORY ({type(exc).__name__}: {exc.strerror or exc}) "
            f"and is still at {record.file_path}"
        )


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
