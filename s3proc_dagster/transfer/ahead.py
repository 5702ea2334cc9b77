"""Chunks landing in S3 while the conversion goes on.

A big file's conversion closes a chunk every fraction of a second; waiting for the last
one before sending the first makes a run cost conversion plus upload. `UploadAhead` is
the conversion's `ChunkSink`: each whole chunk is handed to `land` on a few threads
(the pipeline records, sends and materializes it there, exactly as the upload step
would), so the two overlap. Only the last chunk, known to be whole when the source
ends, and any chunk whose landing failed are left to the upload step.

When the conversion fails, or its pass starts again with the whole file sampled, what
was landed is void: `undo` gets those chunks (the pipeline deletes their objects and
the partial plan). When the process dies instead, crash recovery resets the file and
deletes what no committed manifest vouches for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from s3proc_dagster.files.chunks import ChunkFile
from s3proc_dagster.logs import get_logger

log = get_logger("transfer")

# Landings in flight beside the conversion. On 2 cores, a run of a 760 MB CSV took
# 17.3-17.9 s with 4 and 21.0-21.2 s with 2: a landing mostly waits on S3 and on
# Dagster's event log, so a few hide each other's waits.
AHEAD_THREADS = 4


class UploadAhead:
    """A `ChunkSink` that lands each chunk in the background: `landed()` says which made it."""

    def __init__(
        self,
        land: Callable[[ChunkFile], None],
        undo: Callable[[list[ChunkFile]], None],
        threads: int = AHEAD_THREADS,
    ) -> None:
        self._land, self._undo, self._threads = land, undo, threads
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self._landings: dict[int, tuple[ChunkFile, Future[None]]] = {}

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="upload-ahead")

    def chunk(self, chunk: ChunkFile) -> None:
        with self._lock:
            self._landings[chunk.chunk_index] = (chunk, self._pool.submit(self._land, chunk))

    def restart(self) -> None:
        self._void()
        self._pool = self._new_pool()

    def landed(self) -> frozenset[int]:
        """Wait for every landing; the indexes of the chunks that landed. A landing that
        failed is not the conversion's failure: the upload step sends that chunk again,
        under its retry policy."""
        self._pool.shutdown(wait=True)
        done = set()
        for index, (_, landing) in self._landings.items():
            error = landing.exception()
            if error is None:
                done.add(index)
            else:
                log.info("chunk %d did not land during the conversion (%s: %s)", index, type(error).__name__, error)
        return frozenset(done)

    def discard(self) -> None:
        """The conversion failed: stop, and undo what landed."""
        self._void()

    def _void(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            chunks, self._landings = [c for c, _ in self._landings.values()], {}
        if chunks:
            self._undo(chunks)
