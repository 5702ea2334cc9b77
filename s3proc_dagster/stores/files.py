"""The files aggregate of the store contract: one record per file version, and who holds it.

A file version is (path, SHA-256). One run at a time works on a file: it *claims* the
record (IN_PROGRESS with its run id), and a claim is only as good as its holder's
liveness, which the caller judges (`is_alive`, from Dagster), so a killed run never
blocks its file and two live runs never work on it at once. A backend supplies load,
insert and a compare-and-set on status and holder; every rule is here.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from s3proc_dagster.errors import ConcurrencyConflict, FileBusy, IllegalTransition, RecordNotFound, VersionSuperseded
from s3proc_dagster.models import FileStatus, ProcessingStatus, utcnow
from s3proc_dagster.stores.cas import ANY_HOLDER, CAS_ATTEMPTS
from s3proc_dagster.stores.lifecycle import check_file_transition

RunIsAlive = Callable[[str], bool]


class ClaimOutcome(str, enum.Enum):
    CLAIMED = "claimed"  # this run now holds the file version
    UNCHANGED = "unchanged"  # this version is already COMPLETED: nothing to do
    BUSY = "busy"  # another live run holds the file


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    record: FileStatus

    @property
    def holder(self) -> str | None:
        return self.record.run_id


def _version_fields(new: FileStatus, existing: FileStatus) -> dict[str, Any]:
    """What a newly seen version changes on its file's record."""
    return {
        "checksum": new.checksum,
        "file_size": new.file_size,
        "metadata": new.metadata or existing.metadata,
        "source_bucket": new.source_bucket,
        "source_key": new.source_key,
    }


def _reset_fields(new: FileStatus, existing: FileStatus) -> dict[str, Any]:
    return {
        **_version_fields(new, existing),
        "status": ProcessingStatus.PENDING,
        "error_details": None,
        "completed_at": None,
    }


class FileStore(ABC):
    """Where every file version is tracked, and which run works on it."""

    # ---- primitives a backend provides -------------------------------------------------

    @abstractmethod
    def _insert_file(self, status: FileStatus) -> bool:
        """Insert a new file record; False if the path or id already exists."""

    @abstractmethod
    def _load_file(self, *, file_id: str | None = None, path: str | None = None) -> FileStatus | None: ...

    @abstractmethod
    def _cas_file(
        self, file_id: str, expected: ProcessingStatus, fields: dict[str, Any], expected_run_id: Any = ANY_HOLDER
    ) -> bool:
        """Apply `fields` (snake_case FileStatus fields) if status is still `expected`
        and, unless `expected_run_id` is ANY_HOLDER, the holder is still exactly that run id."""

    @abstractmethod
    def _list_files(self, status: ProcessingStatus | None) -> list[FileStatus]: ...

    # ---- rules ---------------------------------------------------------------------------

    def get(self, file_id: str) -> FileStatus | None:
        return self._load_file(file_id=file_id)

    def get_by_path(self, path: str) -> FileStatus | None:
        return self._load_file(path=path)

    def require(self, file_id: str) -> FileStatus:
        found = self.get(file_id)
        if found is None:
            raise RecordNotFound(f"no file with fileId {file_id!r}")
        return found

    def list_files(self, status: ProcessingStatus | None = None) -> list[FileStatus]:
        return self._list_files(status)

    def record_detected(self, status: FileStatus) -> tuple[FileStatus, bool]:
        """Record a file version without claiming it; return it and whether it needs processing.

        Same path, COMPLETED, same checksum: nothing to do (False). A changed COMPLETED
        file, or a FAILED one asked for again, goes back to PENDING (the reprocess and
        manual-retry edges) with its new checksum and size. A file IN_PROGRESS is left to
        its holder.
        """
        for _ in range(CAS_ATTEMPTS):
            existing = self.get_by_path(status.file_path) or self.get(status.file_id)
            if existing is None:
                if self._insert_file(status.model_copy(update={"status": ProcessingStatus.PENDING, "run_id": None})):
                    return self.require(status.file_id), True
                continue  # another process inserted it first; read theirs
            if existing.status is ProcessingStatus.COMPLETED and existing.checksum == status.checksum:
                return existing, False
            if existing.status is ProcessingStatus.IN_PROGRESS:
                return existing, True
            if existing.status is ProcessingStatus.PENDING:
                if self._cas_file(existing.file_id, ProcessingStatus.PENDING, _version_fields(status, existing)):
                    return self.require(existing.file_id), True
                continue
            if self._cas_file(existing.file_id, existing.status, _reset_fields(status, existing)):
                return self.require(existing.file_id), True
        raise ConcurrencyConflict(f"{status.file_path}: too many concurrent changes")

    def claim(
        self, status: FileStatus, run_id: str, is_alive: RunIsAlive, *, reprocess_completed: bool = False
    ) -> Claim:
        """Make `run_id` the one run working on this file version (`status.checksum`).

        UNCHANGED when this version is already COMPLETED (unless `reprocess_completed`),
        BUSY when another live run holds the file (whatever version it works on: the
        caller decides whether to skip or to wait), CLAIMED otherwise, taking the file
        over from a holder that is no longer alive.
        """
        for _ in range(CAS_ATTEMPTS):
            existing = self.get_by_path(status.file_path) or self.get(status.file_id)
            if existing is None:
                self._insert_file(status.model_copy(update={"status": ProcessingStatus.PENDING, "run_id": None}))
                continue
            if (
                existing.status is ProcessingStatus.COMPLETED
                and existing.checksum == status.checksum
                and not reprocess_completed
            ):
                return Claim(ClaimOutcome.UNCHANGED, existing)
            outcome = self._try_claim(existing, run_id, is_alive, _version_fields(status, existing))
            if outcome is not None:
                return outcome
        raise ConcurrencyConflict(f"{status.file_path}: too many concurrent changes")

    def hold(self, file_id: str, run_id: str, is_alive: RunIsAlive, version: str | None) -> FileStatus:
        """Make sure `run_id` holds the file before it does a step's work.

        A re-execution (a new run) takes over from its failed parent; a FAILED or
        COMPLETED record of the same version goes back to IN_PROGRESS through PENDING.
        Raises FileBusy when another live run holds it, VersionSuperseded when the store
        has moved on to another version of the file.
        """
        for _ in range(CAS_ATTEMPTS):
            existing = self.require(file_id)
            if version is not None and existing.checksum != version:
                raise VersionSuperseded(
                    f"{existing.file_path}: this run processes version {version[:12]}, "
                    f"but the store now records version {(existing.checksum or '?')[:12]}; a newer run owns the file"
                )
            outcome = self._try_claim(existing, run_id, is_alive, {})
            if outcome is None:
                continue
            if outcome.outcome is ClaimOutcome.BUSY:
                raise FileBusy(
                    f"{existing.file_path}: run {outcome.holder} is processing this file", outcome.holder or ""
                )
            return outcome.record
        raise ConcurrencyConflict(f"file {file_id}: too many concurrent changes")

    def _try_claim(
        self, existing: FileStatus, run_id: str, is_alive: RunIsAlive, version: dict[str, Any]
    ) -> Claim | None:
        """One compare-and-set step towards holding `existing`; None means "read again"."""
        file_id, current = existing.file_id, existing.status
        started = {"run_id": run_id, "processing_started_at": utcnow(), "error_details": None, "completed_at": None}
        if current is ProcessingStatus.IN_PROGRESS:
            holder = existing.run_id
            if holder == run_id:
                if version and not self._cas_file(
                    file_id, ProcessingStatus.IN_PROGRESS, version, expected_run_id=run_id
                ):
                    return None
                return Claim(ClaimOutcome.CLAIMED, self.require(file_id))
            if holder and is_alive(holder):
                return Claim(ClaimOutcome.BUSY, existing)
            # The holder is gone (killed, crashed, or this is a re-execution of it): take over.
            if self._cas_file(file_id, ProcessingStatus.IN_PROGRESS, {**version, **started}, expected_run_id=holder):
                return Claim(ClaimOutcome.CLAIMED, self.require(file_id))
            return None
        if current is ProcessingStatus.PENDING:
            check_file_transition(f"file {file_id}", current, ProcessingStatus.IN_PROGRESS)
            if self._cas_file(
                file_id, ProcessingStatus.PENDING, {**version, **started, "status": ProcessingStatus.IN_PROGRESS}
            ):
                return Claim(ClaimOutcome.CLAIMED, self.require(file_id))
            return None
        # FAILED or COMPLETED: back to PENDING first (the manual-retry and reprocess edges).
        check_file_transition(f"file {file_id}", current, ProcessingStatus.PENDING)
        self._cas_file(
            file_id,
            current,
            {**version, "status": ProcessingStatus.PENDING, "error_details": None, "completed_at": None},
        )
        return None

    def _transition(
        self,
        file_id: str,
        new: ProcessingStatus,
        fields: dict[str, Any] | None = None,
        expected_run_id: Any = ANY_HOLDER,
    ) -> FileStatus:
        for _ in range(CAS_ATTEMPTS):
            current = self.require(file_id)
            check_file_transition(f"file {file_id}", current.status, new)
            holder: Any = ANY_HOLDER
            if expected_run_id is not ANY_HOLDER:
                if current.run_id not in (expected_run_id, None):
                    raise FileBusy(
                        f"file {file_id}: held by run {current.run_id}, not {expected_run_id}", current.run_id or ""
                    )
                holder = current.run_id
            if self._cas_file(file_id, current.status, {**(fields or {}), "status": new}, holder):
                return self.require(file_id)
        raise ConcurrencyConflict(f"file {file_id}: too many concurrent changes")

    def start(self, file_id: str, run_id: str | None = None) -> FileStatus:
        return self._transition(
            file_id,
            ProcessingStatus.IN_PROGRESS,
            {"processing_started_at": utcnow(), "error_details": None, "run_id": run_id},
        )

    def complete(
        self,
        file_id: str,
        output_key: str,
        processed_bytes: int | None = None,
        run_id: Any = ANY_HOLDER,
        after_success: str | None = None,
    ) -> FileStatus:
        """COMPLETED with where the output lives; with `run_id`, only while that run holds it;
        with `after_success`, the action still to take on the original, in the same write."""
        if not output_key:
            raise IllegalTransition(f"file {file_id}: COMPLETED requires an s3Key")
        fields: dict[str, Any] = {
            "output_key": output_key,
            "completed_at": utcnow(),
            "error_details": None,
            "after_success": after_success,
        }
        if processed_bytes is not None:
            fields["processed_bytes"] = processed_bytes
        return self._transition(file_id, ProcessingStatus.COMPLETED, fields, expected_run_id=run_id)

    def fail(self, file_id: str, error: str, run_id: Any = ANY_HOLDER) -> FileStatus:
        """FAILED with the reason; with `run_id`, only while that run holds it."""
        return self._transition(
            file_id, ProcessingStatus.FAILED, {"error_details": error, "completed_at": utcnow()}, run_id
        )

    def reset_to_pending(self, file_id: str, reason: str | None = None, run_id: Any = ANY_HOLDER) -> FileStatus:
        """Back to PENDING; with `run_id`, only if that (dead) run still holds it, so
        recovery can never take a file from under a run that just claimed it."""
        return self._transition(
            file_id, ProcessingStatus.PENDING, {"error_details": reason, "completed_at": None}, run_id
        )

    def update_file(self, file_id: str, **fields: Any) -> FileStatus:
        """Change descriptive fields (type, counts, bytes) without a status change."""
        for _ in range(CAS_ATTEMPTS):
            current = self.require(file_id)
            if self._cas_file(file_id, current.status, fields):
                return self.require(file_id)
        raise ConcurrencyConflict(f"file {file_id}: too many concurrent changes")
