"""The files of one run, each as far as the steps have taken it: a run holds one file or a batch.

A run's step is one op over all the run's files (`defs/files/ops.py`), not one op per file:
Dagster's bookkeeping (its event log rows) is then paid per step of the run, not per
step of every file. Each file still has its own records, its own materializations and
its own failure: `each_file` runs a step on every file still in the run and sorts the
errors by what can cure them (`errors.is_transient`), and the caller decides what a
failure costs the file (FAILED, a retry of the step, or a run of its own).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from s3proc_dagster.errors import is_transient
from s3proc_dagster.files.detect import Detection
from s3proc_dagster.models import ARCHIVE_FILE_ID, ProcessingStatus
from s3proc_dagster.pipeline.failure import record_if_missing
from s3proc_dagster.pipeline.records import FileVersion, PreparedItem, UploadedObject, WorkItem
from s3proc_dagster.stores.base import ProgressStore


class Outcome(str, enum.Enum):
    """Why a file is no longer in its run's steps."""

    SKIPPED = "skipped"  # unchanged since its last COMPLETED version, or another live run holds it
    FAILED = "failed"  # failed for good: recorded FAILED with its reason, the original parked
    LEFT = "left"  # still failing when the step's retries were spent: PENDING for a run of its own


@dataclass(frozen=True)
class FileInRun:
    """One file of a run: where it is (the run's config), and what each step made of it."""

    path: str
    relative_path: str = ""
    version: FileVersion | None = None
    detection: Detection | None = None
    items: tuple[WorkItem, ...] = ()
    prepared: tuple[PreparedItem, ...] = ()
    uploaded: tuple[UploadedObject, ...] = ()
    outcome: Outcome | None = None
    reason: str = ""

    @property
    def in_run(self) -> bool:
        """Still to go through the run's next steps."""
        return self.outcome is None

    @property
    def name(self) -> str:
        """How the file is shown in log lines: its relative path once known."""
        return self.version.source.relative_path if self.version else (self.relative_path or self.path)

    def out(self, outcome: Outcome, reason: str = "") -> FileInRun:
        return replace(self, outcome=outcome, reason=reason)


@dataclass(frozen=True)
class Attempt:
    """One attempt of a step over a run's files: each file as the step left it, and the
    ones that failed, permanently or so that a retry may cure them."""

    files: list[FileInRun]
    failed: list[tuple[int, BaseException]] = field(default_factory=list)
    retry: list[tuple[int, BaseException]] = field(default_factory=list)


def each_file(files: list[FileInRun], step: Callable[[FileInRun], FileInRun]) -> Attempt:
    """`step` on every file still in the run, in order; one file's error never stops the others."""
    done: list[FileInRun] = []
    failed: list[tuple[int, BaseException]] = []
    retry: list[tuple[int, BaseException]] = []
    for index, file in enumerate(files):
        if not file.in_run:
            done.append(file)
            continue
        try:
            done.append(step(file))
        except Exception as exc:
            (retry if is_transient(exc) else failed).append((index, exc))
            done.append(file)
    return Attempt(done, failed, retry)


def reason_of(exc: BaseException) -> str:
    """An error as a FAILED record's reason: its message, or its type when it has none."""
    return getattr(exc, "description", None) or str(exc) or type(exc).__name__


def leave_run(store: ProgressStore, run_id: str, file_id: str, source: str, reason: str) -> None:
    """A file leaves its batch run: what the run holds of it (its archive's entries too)
    goes back to PENDING with the reason, so the sensors give it a run of its own."""
    record_if_missing(store, run_id, file_id, source)
    for record in store.list_files(ProcessingStatus.IN_PROGRESS):
        if record.run_id == run_id and (record.file_id == file_id or record.metadata.get(ARCHIVE_FILE_ID) == file_id):
            store.reset_to_pending(record.file_id, reason, run_id=run_id)
