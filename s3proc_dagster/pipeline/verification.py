"""Steps 6 and 7, integrity_verification and progress_update: check, commit, record COMPLETED.

A dataset's manifest is its commit: it is swapped in only once every object is checked
against the store (size, SHA-256), and the previous version's objects go after it, so a
reader never sees a partial dataset or two versions at once (`transfer.manifest`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.logs import about, get_logger
from s3proc_dagster.models import FileStatus
from s3proc_dagster.pipeline.after_success import planned
from s3proc_dagster.pipeline.cache import staged_items
from s3proc_dagster.pipeline.context import StepContext
from s3proc_dagster.pipeline.records import FileVersion, PreparedItem
from s3proc_dagster.pipeline.upload import UPLOAD_THREADS
from s3proc_dagster.transfer import manifest as manifests
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.transfer.verify import verify_object

log = get_logger("pipeline")


def verify_items(
    ctx: StepContext, version: FileVersion, prepared: list[PreparedItem], threads: int = UPLOAD_THREADS
) -> list[manifests.Manifest]:
    """Check every object against the store, then commit each dataset; the manifests committed."""
    ctx.hold(version.file_id, version.sha256)
    committed = []
    for item in prepared:
        if not item.is_tabular:
            staged_items(ctx, version, [item.item])
            local = Path(item.item.local_path)
            known = version.sha256 if item.item.file_id == version.file_id else sha256_file(local)
            verify_object(ctx.client, ctx.bucket, item.key, local.stat().st_size, known)
            continue
        committed.append(_commit(ctx, item, threads))
    return committed


def _commit(ctx: StepContext, item: PreparedItem, threads: int) -> manifests.Manifest:
    chunks = [c for c in ctx.store.list_chunks(item.item.file_id) if c.version == item.item.version]
    parts = [(c.s3_key or "", c.size_bytes or 0, c.sha256 or "") for c in chunks]
    parts += [(c.rejected.s3_key, c.rejected.size_bytes, c.rejected.sha256) for c in chunks if c.rejected]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify") as pool:
        # one HEAD each: a few ms of latency apiece, 400 of them for a 1 GB CSV
        list(pool.map(lambda part: verify_object(ctx.client, ctx.bucket, *part), parts))
    # the record's checksum is the version: an archive entry's reads `<archive sha>:<path>`
    manifest = manifests.build(item.key, item.item.version, item.record_count or 0, item.compression or "", chunks)
    removed = manifests.commit(ctx.client, ctx.bucket, manifest)
    if removed:
        log.info(
            "%s: committed version %s, %d object(s) of earlier versions removed",
            item.item.relative_path,
            manifest.file_sha256[:12],
            removed,
            extra=about(item.item.file_id),
        )
    return manifest


def finish(
    ctx: StepContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    release_staging: bool,
    after_success: str = "keep",
) -> FileStatus:
    """Mark every entry and then the file COMPLETED with where its output lives, and the
    zone's `after_success` still to take on the original (`pipeline.after_success`); with
    `release_staging`, remove the version's staging unless another file still needs it."""
    store, run_id = ctx.store, ctx.claimant.run_id
    ctx.hold(version.file_id, version.sha256)
    for item in prepared:
        if item.item.file_id != version.file_id:
            entry = ctx.hold(item.item.file_id, item.item.version)
            # the entry's size as recorded when it was claimed: its extracted copy may be on another node
            store.complete(item.item.file_id, item.key, processed_bytes=entry.file_size, run_id=run_id)
    own = [p.key for p in prepared if p.item.file_id == version.file_id]
    output_key = own[0] if own else join_key(ctx.prefix, version.source.relative_path)
    done = store.complete(
        version.file_id, output_key, processed_bytes=version.size, run_id=run_id, after_success=planned(after_success)
    )
    if release_staging:
        staging_area.release(ctx.staging, version.sha256, staging_area.versions_in_use(store))
    return done
