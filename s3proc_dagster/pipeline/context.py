"""Who runs a step and with what: the collaborators every step needs, in one record.

A step takes its `StepContext` and the previous step's record, so its signature says
what it works on, not which store, client and folders it was handed; the Dagster layer
builds one per op from its resources (`defs/files/ops.py`), a test or a benchmark from
whatever servers it runs.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3proc_dagster.models import FileStatus
from s3proc_dagster.stores.base import ProgressStore


@dataclass(frozen=True)
class Claimant:
    """The run doing the work, and how to tell whether another run is still alive."""

    run_id: str
    is_alive: Callable[[str], bool]

    def hold(self, store: ProgressStore, file_id: str, version: str | None) -> FileStatus:
        return store.hold(file_id, self.run_id, self.is_alive, version)


@dataclass(frozen=True)
class StepContext:
    """The store and the claim, the S3 client and where outputs go, the staging area and
    where a snapshot can be fetched again (`error_dir`: a failed file is parked there)."""

    store: ProgressStore
    claimant: Claimant
    staging: Path
    client: Any = None
    bucket: str = ""
    prefix: str = ""
    error_dir: Path | None = None

    def hold(self, file_id: str, version: str | None) -> FileStatus:
        """This run still holds this version of the file: every step checks it first, so a
        run whose version was superseded, or whose file another run took over, stops."""
        return self.claimant.hold(self.store, file_id, version)


def worker_name() -> str:
    """The chunk document's processingThread: which host, process and thread did the work."""
    return f"{socket.gethostname()}-pid{os.getpid()}-{threading.current_thread().name}"
