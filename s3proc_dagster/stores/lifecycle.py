"""Every state machine of the store contract, as data, in the one place both stores consult.

Files and chunks follow the specification's processing lifecycle:

    PENDING -> IN_PROGRESS -> COMPLETED
                    |
                    v
                  FAILED -> PENDING (manual retry)

Two edges the specification implies without drawing: COMPLETED -> PENDING when a
changed file is reprocessed ("checksum required ... to re-process modified files"), and
IN_PROGRESS -> PENDING when crash recovery finds no completion marker ("set
status='pending'").
Chunks follow the same machine, plus FAILED -> IN_PROGRESS for a chunk retried in place
and COMPLETED -> COMPLETED, so re-uploading a finished chunk is idempotent; and a chunk may
go from PENDING or FAILED straight to COMPLETED or FAILED: the upload records only how it
ended, one write, because crash recovery deletes every object no COMPLETED chunk vouches
for, so an IN_PROGRESS record would tell it nothing.

An image request follows the image processing design's lifecycle, pending -> processing
-> completed | failed, plus PENDING -> FAILED (a request whose CSV is refused before any
image is fetched) and FAILED -> PENDING; setting the status a request has is no move.
"""

from __future__ import annotations

from s3proc_dagster.errors import IllegalTransition
from s3proc_dagster.models import ProcessingStatus, RequestStatus

FILE_TRANSITIONS: dict[ProcessingStatus, frozenset[ProcessingStatus]] = {
    ProcessingStatus.PENDING: frozenset({ProcessingStatus.IN_PROGRESS}),
    ProcessingStatus.IN_PROGRESS: frozenset(
        {ProcessingStatus.COMPLETED, ProcessingStatus.FAILED, ProcessingStatus.PENDING}
    ),
    ProcessingStatus.COMPLETED: frozenset({ProcessingStatus.PENDING}),
    ProcessingStatus.FAILED: frozenset({ProcessingStatus.PENDING}),
}

CHUNK_TRANSITIONS: dict[ProcessingStatus, frozenset[ProcessingStatus]] = {
    ProcessingStatus.PENDING: frozenset(
        {ProcessingStatus.IN_PROGRESS, ProcessingStatus.COMPLETED, ProcessingStatus.FAILED}
    ),
    ProcessingStatus.IN_PROGRESS: frozenset(
        {ProcessingStatus.COMPLETED, ProcessingStatus.FAILED, ProcessingStatus.IN_PROGRESS}
    ),
    ProcessingStatus.COMPLETED: frozenset({ProcessingStatus.COMPLETED, ProcessingStatus.IN_PROGRESS}),
    ProcessingStatus.FAILED: frozenset(
        {ProcessingStatus.IN_PROGRESS, ProcessingStatus.COMPLETED, ProcessingStatus.FAILED}
    ),
}

REQUEST_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.PENDING: frozenset({RequestStatus.PROCESSING, RequestStatus.FAILED}),
    RequestStatus.PROCESSING: frozenset({RequestStatus.COMPLETED, RequestStatus.FAILED}),
    RequestStatus.COMPLETED: frozenset(),
    RequestStatus.FAILED: frozenset({RequestStatus.PENDING}),
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


def check_request_transition(what: str, current: RequestStatus, new: RequestStatus) -> None:
    if new is not current and new not in REQUEST_TRANSITIONS[current]:
        raise IllegalTransition(f"{what}: cannot go from {current.value} to {new.value}")


def stat_delta(old: ProcessingStatus | None, new: ProcessingStatus) -> dict[str, int]:
    """How a chunk's move from `old` to `new` changes the file's chunk counters."""
    delta: dict[str, int] = {}
    if old is not None:
        delta[STAT_FIELD[old]] = delta.get(STAT_FIELD[old], 0) - 1
    delta[STAT_FIELD[new]] = delta.get(STAT_FIELD[new], 0) + 1
    return {k: v for k, v in delta.items() if v}
