"""The seed's state machine, in the one place both stores consult.

    PENDING -> IN_PROGRESS -> COMPLETED
                    |
                    v
                  FAILED -> PENDING (manual retry)

Two edges the seed implies without drawing: COMPLETED -> PENDING when a changed file is
reprocessed ("checksum required ... to re-process modified files"), and IN_PROGRESS ->
PENDING when crash recovery finds no completion marker ("set status='pending'").
Chunks follow the same machine, plus FAILED -> IN_PROGRESS for a chunk retried in place
and COMPLETED -> COMPLETED, so re-uploading a finished chunk is idempotent.
"""

from __future__ import annotations

from s3proc_dagster.errors import IllegalTransition
from s3proc_dagster.models import ProcessingStatus

FILE_TRANSITIONS: dict[ProcessingStatus, frozenset[ProcessingStatus]] = {
    ProcessingStatus.PENDING: frozenset({ProcessingStatus.IN_PROGRESS}),
    ProcessingStatus.IN_PROGRESS: frozenset(
        {ProcessingStatus.COMPLETED, ProcessingStatus.FAILED, ProcessingStatus.PENDING}
    ),
    ProcessingStatus.COMPLETED: frozenset({ProcessingStatus.PENDING}),
    ProcessingStatus.FAILED: frozenset({ProcessingStatus.PENDING}),
}

CHUNK_TRANSITIONS: dict[ProcessingStatus, frozenset[ProcessingStatus]] = {
    ProcessingStatus.PENDING: frozenset({ProcessingStatus.IN_PROGRESS}),
    ProcessingStatus.IN_PROGRESS: frozenset(
        {ProcessingStatus.COMPLETED, ProcessingStatus.FAILED, ProcessingStatus.IN_PROGRESS}
    ),
    ProcessingStatus.COMPLETED: frozenset({ProcessingStatus.COMPLETED, ProcessingStatus.IN_PROGRESS}),
    ProcessingStatus.FAILED: frozenset({ProcessingStatus.IN_PROGRESS}),
}

STAT_FIELD: dict[ProcessingStatus, str] = {
    ProcessingStatus.PENDING: "pending_chunks",
    ProcessingStatus.IN_PROGRESS: "in_progress_chunks",
    ProcessingStatus.COMPLETED: "completed_chunks",
    ProcessingStatus.FAILED: "failed_chunks",
}


def check_file_transition(what: str, current: ProcessingStatus, new: ProcessingStatus) -> None:
    if new not in FILE_TRANSITIONS[current]:
        raise IllegalTransition(
            f"{what}: cannot go from {current.name} to {new.name}; "
            f"allowed from {current.name}: {', '.join(sorted(s.name for s in FILE_TRANSITIONS[current])) or 'none'}"
        )


def check_chunk_transition(what: str, current: ProcessingStatus, new: ProcessingStatus) -> None:
    if new not in CHUNK_TRANSITIONS[current]:
        raise IllegalTransition(f"{what}: chunk cannot go from {current.name} to {new.name}")


def stat_delta(old: ProcessingStatus | None, new: ProcessingStatus) -> dict[str, int]:
    """How a chunk's move from `old` to `new` changes the file's chunk counters."""
    delta: dict[str, int] = {}
    if old is not None:
        delta[STAT_FIELD[old]] = delta.get(STAT_FIELD[old], 0) - 1
    delta[STAT_FIELD[new]] = delta.get(STAT_FIELD[new], 0) + 1
    return {k: v for k, v in delta.items() if v}
