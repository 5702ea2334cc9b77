"""One op per ProcessingStep. Each body: read resources, call `pipeline`, log, emit events."""

import re
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field

from s3proc_dagster import pipeline, recovery
from s3proc_dagster.defs.resources import PipelineSettings, ProgressStoreResource, S3Storage
from s3proc_dagster.errors import S3ProcError, is_transient
from s3proc_dagster.files import parking
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.detect import Detection
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.pipeline import Claimant, FileVersion, PreparedItem, Source, UploadedObject, WorkItem
from s3proc_dagster.runs.liveness import reap_dead_runs, run_is_alive
from s3proc_dagster.runs.tags import TAG, file_run_tags
from s3proc_dagster.sources.metadata import read_sidecar
from s3proc_dagster.sources.s3_incoming import seed_metadata
from s3proc_dagster.stores.base import ClaimOutcome
from s3proc_dagster.transfer.upload import abort_upload

UPLOAD_POOL = "s3_uploads"
PRODUCT_JOBS = ["process_file_job", "image_request_job", "reconcile_job", "reports_job"]


class SourceConfig(dg.Config):
    """Which file this run processes. The sensor fills it in; so can the Launchpad."""

    path: str = Field(description="absolute path of the file (or s3://bucket/key)")
    relative_path: str = Field(default="", description="path below WATCH_PATH (derived when empty)")


@contextmanager
def classify_failures() -> Iterator[None]:
    """Transient errors keep the op's RetryPolicy; permanent ones fail at once.

    `errors.is_transient` decides: retrying a zip that is not a zip, or a file we may not
    read, cannot help, and a user should not wait through the backoff to learn it.
    """
    try:
        yield
    except Exception as exc:
        if is_transient(exc):
            raise
        raise dg.Failure(description=str(exc) or type(exc).__name__, allow_retries=False) from exc


def claimant(context: dg.OpExecutionContext) -> Claimant:
    return Claimant(context.run_id, run_is_alive(context.instance))


_KEY_PART = re.compile(r"[^A-Za-z0-9_\-]")


def asset_key_for(prefix: str, relative_path: str) -> dg.AssetKey:
    """Stable per-file asset key: the bucket prefix and relative path, folder by folder."""
    parts = [p for p in f"{prefix}/{relative_path}".split("/") if p]
    return dg.AssetKey([_KEY_PART.sub("_", p) for p in parts])


def _local_source(config: SourceConfig, watch_path: str) -> tuple[Source, Path]:
    path = Path(config.path).resolve()
    rel = config.relative_path
    if not rel:
        try:
            rel = path.relative_to(Path(watch_path).resolve()).as_posix()
        except ValueError:
            rel = path.name
    if not path.is_file():
        raise S3ProcError(f"{config.path}: no such file")
    return Source(uri=str(path), relative_path=rel, metadata=read_sidecar(path)), path


def _s3_source(config: SourceConfig, s3: S3Storage) -> Source:
    bucket, _, key = config.path.removeprefix("s3://").partition("/")
    rel = config.relative_path or key.removeprefix(s3.incoming_prefix.strip("/") + "/")
    head = s3.get_client().head_object(Bucket=bucket, Key=key)
    return Source(
        uri=config.path, relative_path=rel, s3_bucket=bucket, s3_key=key, metadata=seed_metadata(head.get("Metadata", {}))
    )


@dg.op(out=dg.Out(FileVersion, is_required=False), tags={"step": "checksum_calculation"})
def checksum_calculation(
    context: dg.OpExecutionContext,
    config: SourceConfig,
    progress_store: ProgressStoreResource,
    settings: PipelineSettings,
    s3: S3Storage,
) -> Iterator[dg.Output]:
    """Snapshot into staging + SHA-256 in one read; an unchanged completed file stops here."""
    store = progress_store.open()
    with classify_failures():
        if config.path.startswith("s3://"):
            source = _s3_source(config, s3)
            snap = pipeline.snapshot_s3_object(s3.get_client(), source.s3_bucket, source.s3_key, settings.staging)
            version = pipeline.record_version(source, snap, store, claimant(context))
        else:
            source, local = _local_source(config, settings.watch_path)
            version = pipeline.take_snapshot(source, local, settings.staging, store, claimant(context))
    if version.outcome is ClaimOutcome.UNCHANGED:
        context.log.info(f"{source.relative_path}: unchanged (sha256 {version.sha256[:12]}), skipped")
        return
    if version.outcome is ClaimOutcome.BUSY:
        context.log.info(
            f"{source.relative_path}: run {version.holder} is already processing this version "
            f"(sha256 {version.sha256[:12]}); this run skips it"
        )
        return
    context.log.info(f"{source.relative_path}: {version.size} bytes, sha256 {version.sha256}")
    context.instance.add_run_tags(
        context.run_id,
        {
            **file_run_tags(source.relative_path, source.uri, version.file_id, source.metadata),
            f"{TAG}/sha256": version.sha256[:12],
        },
    )
    yield dg.Output(
        version,
        metadata={"sha256": version.sha256, "bytes": version.size, "fileId": version.file_id, **source.metadata},
    )


@dg.op(tags={"step": "type_detection"})
def type_detection(context: dg.OpExecutionContext, version: FileVersion, progress_store: ProgressStoreResource) -> Detection:
    with classify_failures():
        detection = pipeline.detect_type(version, progress_store.open(), claimant(context))
    context.log.info(f"{version.source.relative_path}: {detection.file_type.value} ({detection.kind})")
    context.instance.add_run_tags(context.run_id, {f"{TAG}/file_type": detection.kind})
    return detection


@dg.op(tags={"step": "archive_extraction"})
def archive_extraction(
    context: dg.OpExecutionContext,
    version: FileVersion,
    detection: Detection,
    progress_store: ProgressStoreResource,
    settings: PipelineSettings,
) -> list[WorkItem]:
    with classify_failures():
        items = pipeline.plan_work(version, detection, settings.staging, progress_store.open(), claimant(context))
    if len(items) > 1 or items[0].file_id != version.file_id:
        context.log.info(f"{version.source.relative_path}: {len(items)} entries extracted")
    return items


@dg.op(tags={"step": "parquet_conversion"})
def parquet_conversion(
    context: dg.OpExecutionContext,
    version: FileVersion,
    items: list[WorkItem],
    progress_store: ProgressStoreResource,
    settings: PipelineSettings,
    s3: S3Storage,
) -> list[PreparedItem]:
    with classify_failures():
        prepared = pipeline.convert_items(
            items, version, settings.staging, s3.prefix, settings.chunk_size, settings.parquet_compression,
            progress_store.open(), claimant(context),
            rules_dir=Path(settings.validation_rules_dir) if settings.validation_rules_dir else None,
            as_of=date.fromisoformat(settings.validation_as_of) if settings.validation_as_of else None,
            csv_null_strings=settings.csv_null_strings,
        )
    for item in prepared:
        if item.is_dataset:
            failed = sum(c.failed_records for c in item.chunks)
            context.log.info(
                f"{item.item.relative_path}: {item.record_count} records in {len(item.chunks)} chunks"
                + (f", {failed} rejected by validation" if failed else "")
            )
    return prepared


def _chunk_event(obj: UploadedObject, s3: S3Storage) -> dg.AssetMaterialization:
    metadata: dict = {
        "s3_uri": dg.MetadataValue.url(s3.uri(obj.key)),
        "bytes": obj.size,
        "sha256": obj.sha256,
        "duration_s": round(obj.duration_s, 3),
        "fileId": obj.file_id,
        "reused": obj.skipped,
    }
    if obj.chunk_index is not None:
        metadata.update(
            chunk_index=obj.chunk_index,
            rows=obj.record_count,
            start_offset=obj.start_offset,
            end_offset=obj.end_offset,
            compression=obj.compression or "",
        )
    label = f"chunk {obj.chunk_index}" if obj.chunk_index is not None else "object"
    return dg.AssetMaterialization(
        asset_key=asset_key_for(s3.prefix, obj.relative_path),
        description=f"{label} of {obj.relative_path}",
        metadata=metadata,
        tags={"s3proc/kind": "chunk" if obj.chunk_index is not None else "object"},
    )


@dg.op(tags={"step": "streaming"}, pool=UPLOAD_POOL)
def streaming(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> list[UploadedObject]:
    """Upload every chunk; one materialization per chunk as it lands."""
    uploaded = []
    with classify_failures():
        for obj in pipeline.upload_items(
            prepared, version, s3.get_client(), s3.bucket, progress_store.open(), claimant(context)
        ):
            uploaded.append(obj)
            context.log_event(_chunk_event(obj, s3))
    reused = sum(o.skipped for o in uploaded)
    context.log.info(f"{len(uploaded) - reused} objects uploaded, {reused} already in S3")
    return uploaded


@dg.op(tags={"step": "integrity_verification"})
def integrity_verification(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    uploaded: list[UploadedObject],
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> list[PreparedItem]:
    with classify_failures():
        manifests = pipeline.verify_items(
            prepared, version, s3.get_client(), s3.bucket, progress_store.open(), claimant(context)
        )
    context.log.info(f"{len(uploaded)} objects verified, {len(manifests)} manifests written")
    return prepared


@dg.op(tags={"step": "progress_update"})
def progress_update(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    progress_store: ProgressStoreResource,
    s3: S3Storage,
    settings: PipelineSettings,
) -> None:
    store = progress_store.open()
    with classify_failures():
        status = pipeline.finish(
            prepared, version, s3.prefix, store, claimant(context),
            staging=None if settings.staging_retention_s else settings.staging,
        )
    for item in prepared:
        record = store.require(item.item.file_id)
        stats = record.processing_stats
        context.log_event(
            dg.AssetMaterialization(
                asset_key=asset_key_for(s3.prefix, item.item.relative_path),
                description=f"{item.item.relative_path} completed",
                metadata={
                    "s3_uri": dg.MetadataValue.url(s3.uri(item.key)),
                    "fileId": record.file_id,
                    "status": record.status.name,
                    "rows": item.record_count or 0,
                    "chunks": len(item.chunks),
                    "bytes": record.processed_bytes or 0,
                    "sha256": version.sha256,
                    "success_rate": stats.success_rate,
                    "compression": item.compression or "",
                    "file_type": item.item.file_type.value,
                    **({"file_metadata": version.source.metadata} if version.source.metadata else {}),
                    **(
                        {"skipped_rules": "; ".join(f"{r} ({why})" for r, why in item.skipped_rules.items())}
                        if item.skipped_rules
                        else {}
                    ),
                },
                tags={"s3proc/kind": "file"},
            )
        )
    context.log.info(f"{version.source.relative_path}: COMPLETED -> s3://{s3.bucket}/{status.output_key}")


@dg.failure_hook(required_resource_keys={"progress_store", "settings", "s3"})
def mark_failed(context: dg.HookContext) -> None:
    """After an op's last retry: record FAILED with the reason, give up the file's
    multipart uploads, and park the original in the error directory.

    Only what this run holds is touched: a run that failed because another run holds the
    file, or because a newer version superseded its own, leaves that file alone.
    """
    error = context.op_exception
    message = getattr(error, "description", None) or (str(error) if error else "unknown error")
    run = context.instance.get_run_by_id(context.run_id)
    tags = run.tags if run else {}
    file_id = tags.get(f"{TAG}/file_id")
    store = context.resources.progress_store.open()
    if file_id and store.get(file_id) is None and tags.get(f"{TAG}/source"):
        # failed before the file could be recorded (unreadable, bad sidecar): record it now
        source = tags[f"{TAG}/source"]
        store.record_detected(FileStatus(file_id=file_id, file_path=source, file_name=source.rsplit("/", 1)[-1]))
        store.start(file_id, context.run_id)
    reason = f"{context.op.name}: {message}"
    held = [
        record
        for record in store.list_files(ProcessingStatus.IN_PROGRESS)
        if record.run_id == context.run_id and (record.file_id == file_id or record.metadata.get("archiveFileId") == file_id)
    ]
    if not held:
        context.log.warning(f"{tags.get(f'{TAG}/path', file_id)}: this run holds no file to mark FAILED ({message})")
        return
    client = context.resources.s3  # a hook gets what the resource creates: the boto3 client
    for record in held:
        store.fail(record.file_id, reason, run_id=context.run_id)
        for task in store.list_upload_tasks(record.file_id):
            abort_upload(client, task, store)  # given up; if S3 is down, the sweep retries
    main = next((r for r in held if r.file_id == file_id), None)
    if main is None or "://" in main.file_path or not Path(main.file_path).is_file():
        return
    settings: PipelineSettings = context.resources.settings
    try:
        parked = parking.park(
            Path(main.file_path),
            Path(settings.watch_path),
            Path(settings.error_directory),
            {"fileId": file_id, "filePath": main.file_path, "step": context.op.name, "error": message, "runId": context.run_id},
        )
    except OSError as exc:
        note = f"; the original could not be moved to ERROR_DIRECTORY ({type(exc).__name__}: {exc.strerror or exc}) and is still at {main.file_path}"
        store.update_file(main.file_id, error_details=reason + note)
        context.log.error(f"{main.file_path}: FAILED at {context.op.name}: {message}{note}")
        return
    context.log.error(f"{main.file_path}: FAILED at {context.op.name}: {message}; moved to {parked}")


@dg.op(tags={"step": "crash_recovery"})
def reconcile(
    context: dg.OpExecutionContext, progress_store: ProgressStoreResource, s3: S3Storage, settings: PipelineSettings
) -> int:
    """Crash recovery: fail runs that died, settle their files, sweep abandoned uploads."""
    from datetime import timedelta

    from s3proc_dagster.models import utcnow

    store, client = progress_store.open(), s3.get_client()
    for record in reap_dead_runs(context.instance, PRODUCT_JOBS, exclude_run_id=context.run_id):
        run = record.dagster_run
        context.log.info(f"run {run.run_id}: its worker is gone; reported failed")
        file_id, source = run.tags.get(f"{TAG}/file_id"), run.tags.get(f"{TAG}/source")
        if run.job_name == "process_file_job" and file_id and source:
            started = record.start_time or record.create_timestamp.timestamp()
            if recovery.requeue_abandoned(store, file_id, source, run.run_id, started):
                context.log.info(f"{source}: its run died before finishing; PENDING again for the sensor")
    alive = run_is_alive(context.instance, context.run_id)
    report = recovery.recover(store, client, s3.bucket, alive)
    for item in report:
        context.log.info(
            f"{item.file_path}: {item.outcome} (aborted {item.aborted_uploads} uploads, deleted {item.deleted_objects} objects)"
        )
    incoming = (s3.incoming_prefix.strip("/") + "/",) if s3.incoming_prefix and s3.incoming_bucket in ("", s3.bucket) else ()
    swept = recovery.sweep_uploads(
        store, client, s3.bucket, s3.prefix, utcnow() - timedelta(seconds=settings.stale_upload_age_s), alive, incoming
    )
    for key in swept:
        context.log.info(f"s3://{s3.bucket}/{key}: abandoned multipart upload aborted")
    cleaned = staging_area.sweep(
        settings.staging, pipeline.versions_in_use(store), max(settings.staging_retention_s, staging_area.SWEEP_GRACE_S)
    )
    if cleaned.entries:
        context.log.info(f"staging: {cleaned.entries} entries no file needs removed ({cleaned.bytes} bytes)")
    return len(report)
