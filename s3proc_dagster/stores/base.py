"""The progress-store contract, with the state machine and stats arithmetic in one place.

Backends (SQLite, MongoDB) implement a handful of primitives: load, insert, and a
compare-and-set that applies a change only if the record is still in the status we
read. Everything with a rule in it (which transitions are legal, what COMPLETED
requires, how a chunk's move changes the file's counters, who may work on a file) lives
here, so the two backends cannot drift apart. Compare-and-set rather than locks lets
many Dagster run processes write at once.

A file's counters (`processingStats`, `errorSummary`) are derived data: always a pure
function of its chunk records (`totals_of_groups`). A chunk's move and the counters it
changes are written together in one transaction where the backend has one (SQLite;
MongoDB on a replica set or sharded cluster). Where it has none (a standalone MongoDB),
a crash between the two writes can leave the counters behind; `recount` sets them from
the chunk records again, and recovery calls it for every file a dead run held.

A file version is (path, SHA-256). One run at a time works on a file: it *claims* the
record (IN_PROGRESS with its run id), and a claim is only as good as its holder's
liveness, which the caller judges (`is_alive`, from Dagster), so a killed run never
blocks its file and two live runs never work on it at once.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from s3proc_dagster.errors import ConcurrencyConflict, FileBusy, IllegalTransition, RecordNotFound, VersionSuperseded
from s3proc_dagster.models import (
    ChunkStatus,
    FileStatus,
    ProcessingStatus,
    RejectedPart,
    Request,
    RequestData,
    RequestStatus,
    S3UploadTask,
    chunk_id,
    utcnow,
)
from s3proc_dagster.stores.lifecycle import (
    STAT_FIELD,
    check_chunk_transition,
    check_file_transition,
    stat_delta,
)

_CAS_ATTEMPTS = 50


class _Any:
    """Marker: a compare-and-set that does not care who holds the record."""


ANY_HOLDER: Final = _Any()
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


REQUEST_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.PENDING: frozenset({RequestStatus.PROCESSING, RequestStatus.FAILED}),
    RequestStatus.PROCESSING: frozenset({RequestStatus.COMPLETED, RequestStatus.FAILED}),
    RequestStatus.COMPLETED: frozenset(),
    RequestStatus.FAILED: frozenset({RequestStatus.PENDING}),
}


def chunk_contribution(chunk: ChunkStatus) -> dict[str, int]:
    """What one chunk adds to its file's record counters and validation summary.

    Only a COMPLETED chunk's records count: a chunk being redone contributes nothing
    until it lands again, so the file's figures never count a record twice.
    """
    if chunk.status is not ProcessingStatus.COMPLETED:
        return {}
    out = {
        "successful_records": chunk.processing_stats.successful_records,
        "failed_records": chunk.processing_stats.failed_records,
    }
    for rule, count in chunk.error_summary.get("validation", {}).items():
        out[f"validation.{rule}"] = count
    return out


@dataclass(frozen=True)
class ChunkGroup:
    """Chunks of one status, summed, as a store's aggregation hands them back."""

    status: ProcessingStatus
    chunks: int
    successful_records: int
    failed_records: int
    error_summaries: list[dict[str, dict[str, int]]]


def totals_of_groups(groups: Iterable[ChunkGroup]) -> dict[str, int]:
    """The file's counters as its chunk records say, keyed as a chunk move's delta is
    (`completed_chunks`, `successful_records`, `validation.<rule>`, `processing.<kind>`).

    As in `chunk_contribution`, only COMPLETED chunks' records and validation counts
    count. A chunk's `errorSummary.processing` counts every failure it had, and each
    failure added one to the file's, so the file's processing summary is their sum.
    """
    totals: dict[str, int] = {}

    def add(key: str, n: int) -> None:
        totals[key] = totals.get(key, 0) + n

    for group in groups:
        add(STAT_FIELD[group.status], group.chunks)
        counted = group.status is ProcessingStatus.COMPLETED
        if counted:
            add("successful_records", group.successful_records)
            add("failed_records", group.failed_records)
        for summary in group.error_summaries:
            if counted:
                for rule, n in summary.get("validation", {}).items():
                    add(f"validation.{rule}", n)
            for kind, n in summary.get("processing", {}).items():
                add(f"processing.{kind}", n)
    return {k: v for k, v in totals.items() if v}


def totals_from_chunks(chunks: Iterable[ChunkStatus]) -> dict[str, int]:
    return totals_of_groups(
        ChunkGroup(
            c.status, 1, c.processing_stats.successful_records, c.processing_stats.failed_records, [c.error_summary]
        )
        for c in chunks
    )


def _planned(file_id: str, index: int, start: int, end: int, version: str | None) -> ChunkStatus:
    return ChunkStatus(
        chunk_id=chunk_id(file_id, index),
        file_id=file_id,
        chunk_index=index,
        start_offset=start,
        end_offset=end,
        record_count=end - start + 1,
        version=version,
    )


def diff_counts(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    keys = set(old) | set(new)
    return {k: new.get(k, 0) - old.get(k, 0) for k in keys if new.get(k, 0) != old.get(k, 0)}


def _version_fields(new: FileStatus, existing: FileStatus) -> dict[str, Any]:
    """What a newly seen version changes on its file's record."""
    return {
        "checksum": new.checksum,
        "file_size": new.file_size,
        "metadata": new.metadata or existing.metadata,
        "s3_bucket": new.s3_bucket,
        "s3_key": new.s3_key,
    }


def _reset_fields(new: FileStatus, existing: FileStatus) -> dict[str, Any]:
    return {
        **_version_fields(new, existing),
        "status": ProcessingStatus.PENDING,
        "error_details": None,
        "completed_at": None,
    }


def plan_offsets(record_count: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """FIXED_COUNT: chunk i holds records [i*size, min((i+1)*size, n) - 1]."""
    n_chunks = math.ceil(record_count / chunk_size) if record_count else 0
    return [(i, i * chunk_size, min((i + 1) * chunk_size, record_count) - 1) for i in range(n_chunks)]


class ProgressStore(ABC):
    """Where every file, chunk and image request is tracked. Safe from many processes."""

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

    @abstractmethod
    def _replace_chunks(self, file_id: str, chunks: list[ChunkStatus], file_fields: dict[str, Any]) -> None:
        """Drop the file's chunk plan, store `chunks`, reset its counters to match."""

    @abstractmethod
    def _add_chunk(self, chunk: ChunkStatus) -> bool:
        """Store a new PENDING chunk and count it in its file's `pending_chunks`; False
        (and nothing written) when a chunk with its id exists."""

    @abstractmethod
    def _load_chunks(self, file_id: str) -> list[ChunkStatus]: ...

    @abstractmethod
    def _load_chunk(self, chunk_id: str) -> ChunkStatus | None: ...

    @abstractmethod
    def list_all_chunks(self) -> list[ChunkStatus]:
        """Every chunk record, whatever its file: for reports and consistency checks."""

    @abstractmethod
    def _cas_chunk(
        self,
        chunk: ChunkStatus,
        expected: ProcessingStatus,
        expected_retry: int,
        fields: dict[str, Any],
        file_delta: dict[str, int],
    ) -> bool:
        """Update the chunk if its status and retry count are unchanged, and add
        `file_delta` to its file's counters (`completed_chunks`, `validation.<rule>`...)."""

    @abstractmethod
    def _recount(self, file_id: str) -> None:
        """Set the file's counters to the totals of its chunk records (`totals_of_groups`), without
        losing a chunk move that another process makes at the same time."""

    @abstractmethod
    def _insert_request(self, request: Request, rows: list[RequestData]) -> None: ...

    @abstractmethod
    def _cas_request(self, request_id: str, expected: RequestStatus, fields: dict[str, Any]) -> bool: ...

    @abstractmethod
    def get_request(self, request_id: str) -> Request | None: ...

    @abstractmethod
    def list_request_rows(self, request_id: str) -> list[RequestData]: ...

    @abstractmethod
    def list_requests(self) -> list[Request]: ...

    @abstractmethod
    def _update_row(self, request_id: str, serial_number: int, fields: dict[str, Any]) -> bool: ...

    @abstractmethod
    def save_upload_task(self, task: S3UploadTask) -> None:
        """Insert or replace a multipart upload's record (by id)."""

    @abstractmethod
    def find_upload_task(self, bucket: str, s3_key: str, checksum: str) -> S3UploadTask | None:
        """The recorded upload of exactly these bytes (`checksum`) to this key, if any."""

    @abstractmethod
    def list_upload_tasks(self, file_id: str | None = None) -> list[S3UploadTask]: ...

    @abstractmethod
    def delete_upload_task(self, task_id: str) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    # ---- files ---------------------------------------------------------------------------

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
        for _ in range(_CAS_ATTEMPTS):
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
        for _ in range(_CAS_ATTEMPTS):
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
        for _ in range(_CAS_ATTEMPTS):
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
        for _ in range(_CAS_ATTEMPTS):
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
        self, file_id: str, output_key: str, processed_bytes: int | None = None, run_id: Any = ANY_HOLDER
    ) -> FileStatus:
        """COMPLETED with where the output lives; with `run_id`, only while that run holds it."""
        if not output_key:
            raise IllegalTransition(f"file {file_id}: COMPLETED requires an s3Key")
        fields: dict[str, Any] = {"output_key": output_key, "completed_at": utcnow(), "error_details": None}
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
        for _ in range(_CAS_ATTEMPTS):
            current = self.require(file_id)
            if self._cas_file(file_id, current.status, fields):
                return self.require(file_id)
        raise ConcurrencyConflict(f"file {file_id}: too many concurrent changes")

    # ---- chunks --------------------------------------------------------------------------

    def plan_chunks(
        self, file_id: str, record_count: int, chunk_size: int, version: str | None = None
    ) -> list[ChunkStatus]:
        """FIXED_COUNT plan for one file version. The chunks of the same version with the
        same offsets are kept as they are, so re-running a file's steps never forgets which
        chunks already landed, and a plan finished after its first chunks were recorded
        (`plan_chunk`) keeps them; any other version starts from a fresh plan, even with
        the same offsets. `record_count` 0 drops the plan."""
        existing = self._load_chunks(file_id)
        offsets = plan_offsets(record_count, chunk_size)
        kept = {(c.chunk_index, c.start_offset, c.end_offset): c for c in existing if c.version == version}
        if len(kept) == len(existing) and list(kept) == offsets:
            return existing
        chunks = [kept.get((i, start, end)) or _planned(file_id, i, start, end, version) for i, start, end in offsets]
        self._replace_chunks(
            file_id,
            chunks,
            {"estimated_record_count": record_count, "chunk_size": chunk_size, "total_chunks": len(chunks)},
        )
        return self._load_chunks(file_id)

    def plan_chunk(self, file_id: str, chunk_index: int, chunk_size: int, version: str | None) -> ChunkStatus:
        """Record one whole chunk of a plan still being made (PENDING), or the chunk as it is
        when already recorded. A conversion that sends each chunk as soon as it is whole
        records it before the file's record count is known; chunk i of a FIXED_COUNT plan is
        [i*size, (i+1)*size - 1] in every plan with more records than that, so the final
        `plan_chunks` keeps it with whatever happened to it meanwhile."""
        start = chunk_index * chunk_size
        self._add_chunk(_planned(file_id, chunk_index, start, start + chunk_size - 1, version))
        return self.get_chunk(chunk_id(file_id, chunk_index))

    def list_chunks(self, file_id: str) -> list[ChunkStatus]:
        return self._load_chunks(file_id)

    def recount(self, file_id: str) -> FileStatus:
        """Make the file's counters equal its chunk records again; the file as it is then.

        Changes no counter where a chunk move and its counters are one transaction (SQLite,
        MongoDB with transactions), unless the data was written without. On a standalone
        MongoDB it repairs the counters a crash between the two writes left behind;
        `recovery.settle` calls it for every file a dead run held.
        """
        self.require(file_id)
        self._recount(file_id)
        return self.require(file_id)

    def get_chunk(self, chunk_id_: str) -> ChunkStatus:
        chunk = self._load_chunk(chunk_id_)
        if chunk is None:
            raise RecordNotFound(f"no chunk with chunkId {chunk_id_!r}")
        return chunk

    def _chunk_transition(
        self, chunk_id_: str, new: ProcessingStatus, fields: dict[str, Any], processing_error: str | None = None
    ) -> ChunkStatus:
        for _ in range(_CAS_ATTEMPTS):
            current = self.get_chunk(chunk_id_)
            check_chunk_transition(f"chunk {chunk_id_}", current.status, new)
            updates = dict(fields)
            if current.status is ProcessingStatus.FAILED and new is ProcessingStatus.IN_PROGRESS:
                updates["retry_count"] = current.retry_count + 1
            if processing_error:
                summary = {k: dict(v) for k, v in current.error_summary.items()}
                bucket = summary.setdefault("processing", {})
                bucket[processing_error] = bucket.get(processing_error, 0) + 1
                updates["error_summary"] = summary
            after = ChunkStatus.model_validate({**current.model_dump(), **updates, "status": new})
            delta = stat_delta(current.status, new) if current.status is not new else {}
            delta.update(diff_counts(chunk_contribution(current), chunk_contribution(after)))
            if processing_error:
                delta[f"processing.{processing_error}"] = 1
            if self._cas_chunk(current, current.status, current.retry_count, {**updates, "status": new}, delta):
                return self.get_chunk(chunk_id_)
        raise ConcurrencyConflict(f"chunk {chunk_id_}: too many concurrent changes")

    def chunk_started(self, chunk_id_: str, processing_thread: str) -> ChunkStatus:
        return self._chunk_transition(
            chunk_id_,
            ProcessingStatus.IN_PROGRESS,
            {
                "processing_thread": processing_thread,
                "started_at": utcnow(),
                "completed_at": None,
                "error_details": None,
            },
        )

    def chunk_completed(
        self,
        chunk_id_: str,
        *,
        s3_key: str,
        size_bytes: int,
        sha256: str,
        duration: float,
        successful_records: int | None = None,
        failed_records: int = 0,
        validation_errors: dict[str, int] | None = None,
        rejected: RejectedPart | None = None,
    ) -> ChunkStatus:
        current = self.get_chunk(chunk_id_)
        ok = current.record_count - failed_records if successful_records is None else successful_records
        summary = {
            "validation": dict(validation_errors or {}),
            "processing": dict(current.error_summary.get("processing", {})),
        }
        return self._chunk_transition(
            chunk_id_,
            ProcessingStatus.COMPLETED,
            {
                "s3_key": s3_key,
                "size_bytes": size_bytes,
                "sha256": sha256,
                "duration": duration,
                "completed_at": utcnow(),
                "error_details": None,
                "processing_stats": {"successful_records": ok, "failed_records": failed_records},
                "error_summary": summary,
                "rejected": rejected,
            },
        )

    def chunk_failed(self, chunk_id_: str, error: str, error_kind: str = "processingError") -> ChunkStatus:
        return self._chunk_transition(
            chunk_id_,
            ProcessingStatus.FAILED,
            {"error_details": error, "completed_at": utcnow()},
            processing_error=error_kind,
        )

    # ---- image requests ---------------------------------------------------------------------

    def create_request(self, request: Request, rows: Iterable[RequestData]) -> Request:
        self._insert_request(request, list(rows))
        return self.require_request(request.request_id)

    def require_request(self, request_id: str) -> Request:
        found = self.get_request(request_id)
        if found is None:
            raise RecordNotFound(f"no image request with requestId {request_id!r}")
        return found

    def set_request_status(self, request_id: str, new: RequestStatus, **fields: Any) -> Request:
        for _ in range(_CAS_ATTEMPTS):
            current = self.require_request(request_id)
            if new is not current.status and new not in REQUEST_TRANSITIONS[current.status]:
                raise IllegalTransition(f"request {request_id}: cannot go from {current.status.value} to {new.value}")
            if self._cas_request(request_id, current.status, {**fields, "status": new, "updated_at": utcnow()}):
                return self.require_request(request_id)
        raise ConcurrencyConflict(f"request {request_id}: too many concurrent changes")

    def set_row_outputs(
        self,
        request_id: str,
        serial_number: int,
        output_image_urls: list[str | None],
        errors: list[str | None],
        completed: bool,
    ) -> None:
        fields: dict[str, Any] = {"output_image_urls": output_image_urls, "errors": errors}
        if completed:
            fields["completed_at"] = utcnow()
        if not self._update_row(request_id, serial_number, fields):
            raise RecordNotFound(f"no row {serial_number} in request {request_id!r}")
