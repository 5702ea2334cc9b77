"""The chunks aggregate of the store contract: a file's FIXED_COUNT plan and each chunk's moves.

A file's counters (`processingStats`, `errorSummary`) are derived data: always a pure
function of its chunk records (`totals_of_groups`). A chunk's move and the counters it
changes are written together in one transaction where the backend has one (SQLite;
MongoDB on a replica set or sharded cluster). Where it has none (a standalone MongoDB),
a crash between the two writes can leave the counters behind; `recount` sets them from
the chunk records again, and recovery calls it for every file a dead run held.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from s3proc_dagster.errors import ConcurrencyConflict, RecordNotFound
from s3proc_dagster.models import ChunkStatus, FileStatus, ProcessingStatus, RejectedPart, chunk_id, utcnow
from s3proc_dagster.stores.cas import CAS_ATTEMPTS
from s3proc_dagster.stores.lifecycle import STAT_FIELD, check_chunk_transition, stat_delta


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


def counts_of(chunk: ChunkStatus) -> dict[str, int]:
    """What a chunk counts for in its file's counters when it is first recorded: its status,
    and, COMPLETED, its records; its processing failures whatever its status."""
    out = {**stat_delta(None, chunk.status), **chunk_contribution(chunk)}
    for kind, n in chunk.error_summary.get("processing", {}).items():
        out[f"processing.{kind}"] = n
    return out


def diff_counts(old: dict[str, int], new: dict[str, int]) -> dict[str, int]:
    keys = set(old) | set(new)
    return {k: new.get(k, 0) - old.get(k, 0) for k in keys if new.get(k, 0) != old.get(k, 0)}


def plan_offsets(record_count: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """FIXED_COUNT: chunk i holds records [i*size, min((i+1)*size, n) - 1]."""
    n_chunks = math.ceil(record_count / chunk_size) if record_count else 0
    return [(i, i * chunk_size, min((i + 1) * chunk_size, record_count) - 1) for i in range(n_chunks)]


class ChunkStore(ABC):
    """Where every chunk of every file is tracked, with its file's counters kept equal to them."""

    # ---- primitives a backend provides -------------------------------------------------

    @abstractmethod
    def _replace_chunks(self, file_id: str, chunks: list[ChunkStatus], file_fields: dict[str, Any]) -> None:
        """Drop the file's chunk plan, store `chunks`, reset its counters to match."""

    @abstractmethod
    def _add_chunk(self, chunk: ChunkStatus, file_delta: dict[str, int]) -> bool:
        """Store a new chunk and add `file_delta` (what it counts for, `counts_of`) to its
        file's counters, in one write; False (and nothing written) when its id exists."""

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
    def require(self, file_id: str) -> FileStatus:
        """The file's record, from `FileStore.require`: a recount needs the file and returns it."""

    # ---- rules ---------------------------------------------------------------------------

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
        chunk = _planned(file_id, chunk_index, start, start + chunk_size - 1, version)
        self._add_chunk(chunk, counts_of(chunk))
        return self.get_chunk(chunk_id(file_id, chunk_index))

    def add_landed_chunk(self, chunk: ChunkStatus) -> ChunkStatus:
        """Record a whole chunk that landed (COMPLETED) or could not (FAILED) while its plan
        was still being made, in one write: no PENDING or IN_PROGRESS record comes first,
        since crash recovery deletes every object no COMPLETED chunk vouches for. A chunk
        already recorded (a landing tried again) moves by the state machine instead."""
        if self._add_chunk(chunk, counts_of(chunk)):
            return chunk
        if chunk.status is ProcessingStatus.COMPLETED:
            return self.chunk_completed(
                chunk.chunk_id,
                s3_key=chunk.s3_key or "",
                size_bytes=chunk.size_bytes or 0,
                sha256=chunk.sha256 or "",
                duration=chunk.duration or 0.0,
                successful_records=chunk.processing_stats.successful_records,
                failed_records=chunk.processing_stats.failed_records,
                validation_errors=chunk.error_summary.get("validation", {}),
                rejected=chunk.rejected,
            )
        (kind, *_) = chunk.error_summary.get("processing") or {"processingError": 1}
        return self.chunk_failed(chunk.chunk_id, chunk.error_details or "", error_kind=kind)

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
        for _ in range(CAS_ATTEMPTS):
            current = self.get_chunk(chunk_id_)
            check_chunk_transition(f"chunk {chunk_id_}", current.status, new)
            updates = dict(fields)
            if current.status is ProcessingStatus.FAILED:  # tried again, however it ends
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
        processing_thread: str | None = None,
        started_at: datetime | None = None,
    ) -> ChunkStatus:
        """COMPLETED with what landed, from any state but COMPLETED of another landing: the
        one write an upload makes (`processing_thread`, `started_at` with it)."""
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
                **({"processing_thread": processing_thread} if processing_thread else {}),
                **({"started_at": started_at} if started_at else {}),
            },
        )

    def chunk_failed(self, chunk_id_: str, error: str, error_kind: str = "processingError") -> ChunkStatus:
        return self._chunk_transition(
            chunk_id_,
            ProcessingStatus.FAILED,
            {"error_details": error, "completed_at": utcnow()},
            processing_error=error_kind,
        )
