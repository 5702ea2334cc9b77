"""Step 5, S3 upload: every chunk and plain object to S3, each recorded as it lands.

Chunks go up on a few threads: one chunk is a few MB, so a single stream spends most of
its time on per-request latency. Finished chunks are skipped, so a retried or
re-executed step never uploads a chunk twice; a chunk that fails is recorded FAILED with
the reason before the error reaches Dagster's retry policy. A large plain file goes up
as a multipart upload recorded in the store, so a retry resumes it. `landing` is the
same upload, handed to the conversion so that chunks land while it goes on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from pathlib import Path

from s3proc_dagster.files.chunks import ChunkFile
from s3proc_dagster.logs import about, get_logger
from s3proc_dagster.models import ChunkStatus, ProcessingStatus, RejectedPart, utcnow
from s3proc_dagster.pipeline.cache import chunks_on_disk, staged_items
from s3proc_dagster.pipeline.context import StepContext, worker_name
from s3proc_dagster.pipeline.conversion import Landing, convert_again
from s3proc_dagster.pipeline.records import FileVersion, PreparedItem, UploadedObject
from s3proc_dagster.transfer.ahead import UploadAhead
from s3proc_dagster.transfer.recovery import delete_keys
from s3proc_dagster.transfer.upload import UploadResult, upload_file
from s3proc_dagster.transfer.verify import object_matches, verify_object

log = get_logger("pipeline")
UPLOAD_THREADS = 8
PARQUET_TYPE = "application/vnd.apache.parquet"


def upload_items(
    ctx: StepContext, version: FileVersion, prepared: list[PreparedItem], threads: int = UPLOAD_THREADS
) -> Iterator[UploadedObject]:
    """Upload every chunk and plain object, yielding each as it lands (in chunk order)."""
    ctx.hold(version.file_id, version.sha256)
    for item in prepared:
        if not item.is_tabular:
            staged_items(ctx, version, [item.item])
            yield _upload_plain(ctx, version, item)
            continue
        records = {c.chunk_index: c for c in ctx.store.list_chunks(item.item.file_id)}
        on_disk = _chunks_here(ctx, version, item, records)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="upload") as pool:
            upload = partial(_upload_chunk, ctx, on_disk, records=records, run=ctx.claimant.run_id)
            yield from pool.map(upload, on_disk.chunks)


def landing(ctx: StepContext, on_landed: Callable[[UploadedObject], None] | None = None) -> Landing:
    """What the conversion hands its whole chunks to: each is recorded, sent, verified and
    reported to `on_landed` exactly as `upload_items` would, on `transfer.ahead`'s threads."""
    return partial(_land_ahead, ctx, on_landed)


def _land_ahead(
    ctx: StepContext, on_landed: Callable[[UploadedObject], None] | None, target: PreparedItem, chunk_size: int
) -> UploadAhead | None:
    """Chunks landing while `target` converts, unless there is no client or chunks of this
    version are recorded already (a conversion run again on a node without the chunk
    files: its chunks may be COMPLETED, and a failed conversion must not undo those)."""
    item, store = target.item, ctx.store
    if ctx.client is None:
        return None
    recorded = store.list_chunks(item.file_id)
    if any(c.version == item.version for c in recorded):
        return None
    if recorded:
        store.plan_chunks(item.file_id, 0, chunk_size, version=item.version)  # an older version's plan goes

    def land(chunk: ChunkFile) -> None:
        landed = _upload_chunk(ctx, target, chunk, records={}, chunk_size=chunk_size)
        if on_landed is not None:
            on_landed(landed)

    def undo(chunks: list[ChunkFile]) -> None:
        keys = [target.part_key(c) for c in chunks] + [target.part_key(c, rejected=True) for c in chunks]
        with contextlib.suppress(Exception):  # best effort: crash recovery and the next commit sweep too
            delete_keys(ctx.client, ctx.bucket, keys)
        store.plan_chunks(item.file_id, 0, chunk_size, version=item.version)

    return UploadAhead(land, undo)


def _chunks_here(
    ctx: StepContext, version: FileVersion, item: PreparedItem, records: dict[int, ChunkStatus]
) -> PreparedItem:
    """The item with its chunk files on this node, converted again from the snapshot when
    a chunk still to upload is missing. Chunks COMPLETED and verified in S3 are not needed
    (they are never sent again), so a node that lacks only those converts nothing."""
    missing = [c for c in item.chunks if not chunks_on_disk(c)]
    if all(_already_uploaded(ctx, item, c, records[c.chunk_index]) for c in missing):
        return item
    return convert_again(ctx, version, item)


def _already_uploaded(
    ctx: StepContext, item: PreparedItem, chunk: ChunkFile, record: ChunkStatus, trust_record: bool = False
) -> bool:
    """A chunk of this very version, COMPLETED, whose objects are still in S3 with the
    recorded checksums, needs no upload. `trust_record` spares the HEADs for a chunk that
    this very run landed and verified moments ago (the verification step checks it again)."""
    key = item.part_key(chunk)
    if record.status is not ProcessingStatus.COMPLETED or record.version != item.item.version or record.s3_key != key:
        return False
    rejected = record.rejected
    if chunk.rejected_path and (rejected is None or rejected.s3_key != item.part_key(chunk, rejected=True)):
        return False
    if trust_record:
        return True
    if not object_matches(ctx.client, ctx.bucket, key, record.size_bytes or 0, record.sha256 or ""):
        return False
    return rejected is None or object_matches(
        ctx.client, ctx.bucket, rejected.s3_key, rejected.size_bytes, rejected.sha256
    )


def _upload_chunk(
    ctx: StepContext,
    item: PreparedItem,
    chunk: ChunkFile,
    *,
    records: dict[int, ChunkStatus],
    run: str = "",
    chunk_size: int = 0,
) -> UploadedObject:
    """One chunk (and its rejected records) to S3, unless it is there already, recorded in
    one write once it landed (COMPLETED with what landed) or failed (FAILED with why). A
    chunk not recorded yet (`records` lacks it: it lands while the conversion goes on, in a
    plan of `chunk_size`) gets its record with that write."""
    current = records.get(chunk.chunk_index)
    # landed by this very run's conversion, which reported it; a re-execution reports it again
    ahead = chunk.chunk_index in item.sent_ahead and item.landed_in_run == run != ""
    landed = partial(
        UploadedObject,
        file_id=item.item.file_id,
        relative_path=item.item.relative_path,
        key=item.part_key(chunk),
        chunk=chunk,
        compression=item.compression,
    )
    if current is not None and _already_uploaded(ctx, item, chunk, current, trust_record=ahead):
        size, sha256, duration = current.size_bytes or 0, current.sha256 or "", current.duration or 0.0
        return landed(size=size, sha256=sha256, duration_s=duration, reused=True, ahead=ahead)
    started, at = time.monotonic(), utcnow()
    try:
        result, rejected = _send_chunk(ctx, item, chunk)
    except Exception as exc:
        _record_chunk(ctx, item, chunk, current, chunk_size, started_at=at, error=f"{type(exc).__name__}: {exc}")
        raise
    duration = time.monotonic() - started
    log.debug(  # debug: each chunk is a row of its file's materialization
        "%s: chunk %d uploaded (%d bytes, %.2fs)",
        item.item.relative_path,
        chunk.chunk_index,
        result.size,
        duration,
        extra=about(item.item.file_id, chunkId=item.chunk_id(chunk), s3Key=result.key, sha256=result.sha256),
    )
    landing = {"s3_key": result.key, "size_bytes": result.size, "sha256": result.sha256, "duration": duration}
    _record_chunk(ctx, item, chunk, current, chunk_size, started_at=at, landed=landing, rejected=rejected)
    return landed(size=result.size, sha256=result.sha256, duration_s=duration, reused=False)


def _record_chunk(
    ctx: StepContext,
    item: PreparedItem,
    chunk: ChunkFile,
    current: ChunkStatus | None,
    chunk_size: int,
    *,
    started_at: datetime,
    landed: dict | None = None,
    rejected: RejectedPart | None = None,
    error: str = "",
) -> None:
    """How the chunk's upload ended, in one store write (`stores.chunks`)."""
    store, chunk_id = ctx.store, item.chunk_id(chunk)
    ok = chunk.record_count - chunk.failed_records
    if current is None:
        start = chunk.chunk_index * chunk_size
        record = ChunkStatus(
            chunk_id=chunk_id,
            file_id=item.item.file_id,
            chunk_index=chunk.chunk_index,
            start_offset=start,
            end_offset=start + chunk_size - 1,
            record_count=chunk_size,
            version=item.item.version,
            processing_thread=worker_name(),
            started_at=started_at,
            completed_at=utcnow(),
            status=ProcessingStatus.COMPLETED if landed else ProcessingStatus.FAILED,
            error_details=error or None,
            processing_stats={"successful_records": ok, "failed_records": chunk.failed_records} if landed else {},
            error_summary={
                "validation": dict(chunk.rule_counts) if landed else {},
                "processing": {} if landed else {"s3UploadFailure": 1},
            },
            rejected=rejected,
            **(landed or {}),
        )
        store.add_landed_chunk(record)
    elif landed:
        store.chunk_completed(
            chunk_id,
            **landed,
            successful_records=ok,
            failed_records=chunk.failed_records,
            validation_errors=chunk.rule_counts,
            rejected=rejected,
            processing_thread=worker_name(),
            started_at=started_at,
        )
    else:
        store.chunk_failed(chunk_id, error, error_kind="s3UploadFailure")


def _send_chunk(ctx: StepContext, item: PreparedItem, chunk: ChunkFile) -> tuple[UploadResult, RejectedPart | None]:
    """The chunk's part and, when validation rejected records, its `_rejected/` part."""
    file_id = item.item.file_id
    send = partial(upload_file, ctx.client, ctx.bucket, content_type=PARQUET_TYPE, journal=ctx.store, file_id=file_id)
    result = send(item.part_key(chunk), chunk.path, metadata={"x-completed": "true", "x-file-id": file_id})
    if not chunk.rejected_path:
        return result, None
    sent = send(
        item.part_key(chunk, rejected=True),
        chunk.rejected_path,
        metadata={"x-completed": "true", "x-file-id": file_id, "x-rejected": "true"},
    )
    verify_object(ctx.client, ctx.bucket, sent.key, sent.size, sent.sha256)
    return result, RejectedPart(s3_key=sent.key, size_bytes=sent.size, sha256=sent.sha256, records=chunk.failed_records)


def _upload_plain(ctx: StepContext, version: FileVersion, item: PreparedItem) -> UploadedObject:
    """A file that is not tabular, as it is: its SHA-256 is known when it is the file itself."""
    started = time.monotonic()
    known = version.sha256 if item.item.file_id == version.file_id else None
    result = upload_file(
        ctx.client,
        ctx.bucket,
        item.key,
        Path(item.item.local_path),
        content_type=item.item.content_type,
        metadata={"x-completed": "true", "x-file-id": item.item.file_id},
        journal=ctx.store,
        file_id=item.item.file_id,
        sha256=known,
    )
    if result.parts_sent < result.parts:
        log.info(
            "%s: resumed a multipart upload, %d of %d parts were already in S3",
            item.item.relative_path,
            result.parts - result.parts_sent,
            result.parts,
            extra={"fields": {"fileId": item.item.file_id, "s3Key": item.key}},
        )
    return UploadedObject(
        file_id=item.item.file_id,
        relative_path=item.item.relative_path,
        key=item.key,
        size=result.size,
        sha256=result.sha256,
        duration_s=time.monotonic() - started,
        reused=False,
    )
