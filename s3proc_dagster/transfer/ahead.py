"""Chunks on their way to S3 while the conversion goes on.

A big file's conversion closes a chunk every fraction of a second; waiting for the last
one before sending the first makes a run cost conversion plus upload. `UploadAhead`
sends each chunk as it closes, to the chunk's own versioned part key, so the two
overlap. It records nothing: the chunk plan needs the record count, known only when the
pass ends. The upload step then `adopt`s an object whose size and SHA-256 match the
local chunk file (recording it and materializing it as landed) instead of sending it
again; an object that does not match (a send that failed, or a pass that was run again)
is simply sent.

An object nobody will adopt is deleted when the conversion fails (`discard`); when the
process dies instead, crash recovery deletes every object under the dataset that
neither the committed manifest nor a COMPLETED chunk of the version vouches for.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.files.tabular import ChunkFile
from s3proc_dagster.logs import get_logger
from s3proc_dagster.transfer.upload import UploadResult, upload_file
from s3proc_dagster.transfer.verify import head

log = get_logger("transfer")

# Sends in flight beside the conversion: enough to hide a PUT's latency, few enough
# that the conversion keeps the CPU (measured with benchmarks/run.py --size 1GB).
AHEAD_THREADS = 4

KeyFor = Callable[[ChunkFile, bool], str]  # (chunk, rejected part?) -> S3 key


class UploadAhead:
    """Sends chunks in the background; `landed()` says which made it, `discard()` undoes them."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        key_for: KeyFor,
        *,
        content_type: str,
        metadata: dict[str, str],
        threads: int = AHEAD_THREADS,
    ) -> None:
        self._client, self._bucket, self._key_for = client, bucket, key_for
        self._content_type, self._metadata = content_type, metadata
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="upload-ahead")
        self._sends: dict[int, Future[None]] = {}
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def send(self, chunk: ChunkFile) -> None:
        """Queue `chunk` (its data part and, with rules on, its rejected part); returns at once."""
        with self._lock:
            self._sends[chunk.chunk_index] = self._pool.submit(self._put, chunk)

    def _put(self, chunk: ChunkFile) -> None:
        parts = [(chunk.path, False)] + ([(chunk.rejected_path, True)] if chunk.rejected_path else [])
        for path, rejected in parts:
            key = self._key_for(chunk, rejected)
            with self._lock:
                self._keys.add(key)  # before the PUT: a send cut short is deleted too
            metadata = {**self._metadata, **({"x-rejected": "true"} if rejected else {})}
            upload_file(self._client, self._bucket, key, path, content_type=self._content_type, metadata=metadata)

    def landed(self) -> frozenset[int]:
        """Wait for every send; the indexes of the chunks whose every part was sent. A send
        that failed is not an error here: the upload step sends that chunk, with retries."""
        self._pool.shutdown(wait=True)
        sent = set()
        for index, future in self._sends.items():
            error = future.exception()
            if error is None:
                sent.add(index)
            else:
                log.info("chunk %d not sent ahead (%s); the upload step sends it", index, type(error).__name__)
        return frozenset(sent)

    def discard(self) -> None:
        """The conversion failed: stop sending and delete what was sent (best effort: crash
        recovery and the next commit of the dataset delete what this could not)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        keys = sorted(self._keys)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            with contextlib.suppress(Exception):
                self._client.delete_objects(Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True})


def adopt(client: Any, bucket: str, key: str, path: Path) -> UploadResult | None:
    """The object at `key` as an upload of `path`, when it holds exactly these bytes
    (size and the `x-sha256` it was sent with); None when it must be sent."""
    size, sha256 = path.stat().st_size, sha256_file(path)
    found = head(client, bucket, key)
    if found is None or found["ContentLength"] != size or found.get("Metadata", {}).get("x-sha256") != sha256:
        return None
    return UploadResult(key, size, sha256, found["ETag"].strip('"'), parts=1, parts_sent=0)
