"""The progress-store contract: four aggregates, each with its rules in one place.

Backends (SQLite, MongoDB) implement a handful of primitives per aggregate: load,
insert, and a compare-and-set that applies a change only if the record is still in the
status we read (`cas.py`). Everything with a rule in it (which transitions are legal,
what COMPLETED requires, how a chunk's move changes the file's counters, who may work on
a file) lives in the aggregate's module, so the two backends cannot drift apart.
Compare-and-set rather than locks lets many Dagster run processes write at once.

    files.py      FileStore      file versions and the run that holds each (claims)
    chunks.py     ChunkStore     a file's chunk plan, each chunk's moves, the file's counters
    requests.py   RequestStore   image requests and their rows
    uploads.py    UploadStore    the upload journal: multipart uploads in flight
    lifecycle.py                 every transition table, checked there

A backend subclasses `ProgressStore`, their union, so one store object serves a run.
"""

from __future__ import annotations

from abc import abstractmethod

from s3proc_dagster.stores.cas import ANY_HOLDER
from s3proc_dagster.stores.chunks import ChunkStore
from s3proc_dagster.stores.files import Claim, ClaimOutcome, FileStore, RunIsAlive
from s3proc_dagster.stores.requests import RequestStore
from s3proc_dagster.stores.uploads import UploadStore


class ProgressStore(FileStore, ChunkStore, RequestStore, UploadStore):
    """Where every file, chunk and image request is tracked. Safe from many processes."""

    @abstractmethod
    def close(self) -> None: ...


__all__ = ["ANY_HOLDER", "Claim", "ClaimOutcome", "ProgressStore", "RunIsAlive"]
