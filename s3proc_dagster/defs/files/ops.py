"""One op per ProcessingStep. Each body: read resources, call `pipeline`, log, emit events."""

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Iterator

import dagster as dg
from pydantic import Field

from s3proc_dagster import pipeline
from s3proc_dagster.defs.resources import PipelineSettings, ProgressStoreResource, S3Storage
from s3proc_dagster.errors import ChecksumMismatch, S3ProcError
from s3proc_dagster.files.detect import Detection
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.pipeline import FileVersion, PreparedItem, Source, UploadedObject, WorkItem
from s3proc_dagster.sources.metadata import read_sidecar
from s3proc_dagster.sources.s3_incoming import seed_metadata

UPLOAD_POOL = "s3_uploads"
TAG = "s3proc"  # run tags: s3proc/path, s3proc/file_id, s3proc/file_type, s3proc/sha256


class SourceConfig(dg.Config):
    """Which file this run processes. The sensor fills it in; so can the Launchpad."""

    path: str = Field(description="absolute path of the file (or s3://bucket/key)")
    relative_path: str = Field(default="", description="path below WATCH_PATH (derived when empty)")


@contextmanager
def deterministic_failures() -> Iterator[None]:
    """Bad input fails at once: retrying a zip that is not a zip cannot help.

    Transient errors (network, S3, a checksum mismatch after upload) keep the op's
    RetryPolicy; the product's own input errors become non-retryable Failures with the
    user-facing message as their description.
    """
    try:
        yield
    except ChecksumMismatch:
        raise
    except S3ProcError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc


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
    with deterministic_failures():
        if config.path.startswith("s3://"):
            source = _s3_source(config, s3)
            snap = pipeline.snapshot_s3_object(s3.get_client(), source.s3_bucket, source.s3_key, settings.staging)
            version = pipeline.record_version(source, snap, store)
        else:
            source, local = _local_source(config, settings.watch_path)
            version = pipeline.take_snapshot(source, local, settings.staging, store)
    if not version.needed:
        context.log.info(f"{source.relative_path}: unchanged (sha256 {version.sha256[:12]}), skipped")
        return
    context.log.info(f"{source.relative_path}: {version.size} bytes, sha256 {version.sha256}")
    context.instance.add_run_tags(
        context.run_id,
        {
            f"{TAG}/file_id": version.file_id,
            f"{TAG}/sha256": version.sha256[:12],
            # who holds the file, so crash recovery can tell a live run from a killed one
            f"{TAG}/host": socket.gethostname(),
            f"{TAG}/pid": str(os.getpid()),
        },
    )
    yield dg.Output(
        version,
        metadata={"sha256": version.sha256, "bytes": version.size, "fileId": version.file_id, **source.metadata},
    )


@dg.op(tags={"step": "type_detection"})
def type_detection(context: dg.OpExecutionContext, version: FileVersion, progress_store: ProgressStoreResource) -> Detection:
    with deterministic_failures():
        detection = pipeline.detect_type(version, progress_store.open())
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
    with deterministic_failures():
        items = pipeline.plan_work(version, detection, settings.staging, progress_store.open())
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
    with deterministic_failures():
        prepared = pipeline.convert_items(
            items, version, settings.staging, s3.prefix, settings.chunk_size, settings.parquet_compression,
            progress_store.open(),
            rules_dir=Path(settings.validation_rules_dir) if settings.validation_rules_dir else None,
            as_of=date.fromisoformat(settings.validation_as_of) if settings.validation_as_of else None,
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
    with deterministic_failures():
        for obj in pipeline.upload_items(prepared, version, s3.get_client(), s3.bucket, progress_store.open()):
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
    with deterministic_failures():
        manifests = pipeline.verify_items(prepared, version, s3.get_client(), s3.bucket, progress_store.open())
    context.log.info(f"{len(uploaded)} objects verified, {len(manifests)} manifests written")
    return prepared


@dg.op(tags={"step": "progress_update"})
def progress_update(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> None:
    store = progress_store.open()
    with deterministic_failures():
        status = pipeline.finish(prepared, version, s3.prefix, store)
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
                    "bytes": version.size if item.item.file_id == version.file_id else Path(item.item.local_path).stat().st_size,
                    "sha256": version.sha256,
                    "success_rate": stats.success_rate,
                    "compression": item.compression or "",
                    "file_type": item.item.file_type.value,
                    **({"file_metadata": version.source.metadata} if version.source.metadata else {}),
                },
                tags={"s3proc/kind": "file"},
            )
        )
    context.log.info(f"{version.source.relative_path}: COMPLETED -> s3://{s3.bucket}/{status.output_key}")


@dg.failure_hook(required_resource_keys={"progress_store", "settings"})
def mark_failed(context: dg.HookContext) -> None:
    """After an op's last retry: record FAILED with the reason, and move the original to
    the error directory (same relative path) with a `.error.json` beside it."""
    error = context.op_exception
    message = getattr(error, "description", None) or (str(error) if error else "unknown error")
    run = context.instance.get_run_by_id(context.run_id)
    tags = run.tags if run else {}
    file_id = tags.get(f"{TAG}/file_id")
    store = context.resources.progress_store.open()
    status = store.get(file_id) if file_id else None
    if status is None and file_id and tags.get(f"{TAG}/source"):
        # failed before the file could be recorded (unreadable, bad sidecar): record it now
        source = tags[f"{TAG}/source"]
        status, _ = store.record_detected(
            FileStatus(file_id=file_id, file_path=source, file_name=source.rsplit("/", 1)[-1])
        )
        store.start(file_id)
    if status is None:
        return
    reason = f"{context.op.name}: {message}"
    for record in store.list_files(ProcessingStatus.IN_PROGRESS):
        if record.file_id == file_id or record.metadata.get("archiveFileId") == file_id:
            store.fail(record.file_id, reason)
    context.log.error(f"{status.file_path}: FAILED at {context.op.name}: {message}")
    original = Path(status.file_path)
    watch = Path(context.resources.settings.watch_path)
    if "://" in status.file_path or not original.is_file():
        return
    try:
        rel = original.resolve().relative_to(watch.resolve())
    except ValueError:
        rel = Path(original.name)
    target = Path(context.resources.settings.error_directory) / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(original), target)
    target.with_name(target.name + ".error.json").write_text(
        json.dumps(
            {
                "fileId": file_id,
                "filePath": status.file_path,
                "step": context.op.name,
                "error": message,
                "runId": context.run_id,
                "failedAt": datetime.now(UTC).isoformat(),
            },
            indent=2,
        )
    )


IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _process_gone(run: dg.DagsterRun) -> bool:
    """True when the run's worker process was on this host and no longer exists."""
    pid = run.tags.get(f"{TAG}/pid")
    if not pid or run.tags.get(f"{TAG}/host") != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def run_is_alive(instance: dg.DagsterInstance, exclude_run_id: str | None = None):
    """A predicate: does a live run of the instance hold this fileId?

    A run still marked STARTED whose process was killed (SIGKILL, OOM, a reboot) is not
    alive: it is reported failed, so the UI stops showing it as running, and its file is
    recovered.
    """

    def alive(file_id: str) -> bool:
        if not file_id:
            return False
        records = instance.get_run_records(
            dg.RunsFilter(tags={f"{TAG}/file_id": file_id}, statuses=IN_FLIGHT), limit=5
        )
        live = False
        for record in records:
            run = record.dagster_run
            if run.run_id == exclude_run_id:
                continue
            if _process_gone(run):
                instance.report_run_failed(run, "the run's process is gone (killed or crashed); its file was recovered")
                continue
            live = True
        return live

    return alive


@dg.op(tags={"step": "crash_recovery"})
def reconcile(context: dg.OpExecutionContext, progress_store: ProgressStoreResource, s3: S3Storage) -> int:
    """Seed 001's crash recovery over every IN_PROGRESS record whose run is gone."""
    from s3proc_dagster.recovery import recover

    report = recover(
        progress_store.open(), s3.get_client(), s3.bucket, run_is_alive(context.instance, context.run_id)
    )
    for item in report:
        context.log.info(
            f"{item.file_path}: {item.outcome} (aborted {item.aborted_uploads} uploads, deleted {item.deleted_objects} objects)"
        )
    return len(report)
