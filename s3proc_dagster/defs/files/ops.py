"""One op per ProcessingStep, named by it. Each body: resources in, one `pipeline` call, a log line, events out."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import dagster as dg
from pydantic import Field

from s3proc_dagster import pipeline
from s3proc_dagster.defs.files import events
from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.errors import is_transient
from s3proc_dagster.files.detect import Detection
from s3proc_dagster.logs import about, get_logger
from s3proc_dagster.models import ProcessingStep
from s3proc_dagster.names import BATCH_OP, FILE_TYPE_TAG, SHA256_TAG, UPLOAD_POOL
from s3proc_dagster.pipeline import (
    Claimant,
    ConversionRecipe,
    FileVersion,
    PreparedItem,
    StepContext,
    UploadedObject,
    WorkItem,
)
from s3proc_dagster.runs.batching import files_of_run, index_of, mapping_key
from s3proc_dagster.runs.liveness import run_is_alive
from s3proc_dagster.runs.tags import file_run_tags
from s3proc_dagster.sources.resolve import resolve_source
from s3proc_dagster.stores.base import ClaimOutcome

log = get_logger("steps")


class SourceConfig(dg.Config):
    """Which file this run processes. The sensors fill it in; so can the Launchpad."""

    path: str = Field(description="absolute path of the file, or s3://bucket/key")
    relative_path: str = Field(
        default="", description="path below WATCH_PATH or S3_INCOMING_PREFIX (derived when empty)"
    )


@contextmanager
def failures(context: dg.OpExecutionContext, settings: Settings) -> Iterator[None]:
    """Transient errors are retried with backoff (MAX_RETRIES, RETRY_DELAY_MS); permanent ones fail at once.

    `errors.is_transient` decides: retrying a zip that is not a zip, or a file we may not
    read, cannot help, and a user should not wait through the backoff to learn it. The
    retry schedule comes from the settings when the step fails, not from the definitions.
    """
    try:
        yield
    except (dg.Failure, dg.RetryRequested):
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise dg.Failure(description=str(exc) or type(exc).__name__, allow_retries=False) from exc
        processing = settings.config.processing
        if context.retry_number >= processing.max_retries:
            raise
        policy = dg.RetryPolicy(
            max_retries=processing.max_retries,
            delay=processing.retry_delay_ms / 1000,
            backoff=dg.Backoff.EXPONENTIAL,
            jitter=dg.Jitter.PLUS_MINUS,
        )
        wait = max(0.0, policy.calculate_delay(context.retry_number + 1))
        raise dg.RetryRequested(max_retries=processing.max_retries, seconds_to_wait=wait) from exc


def tag_run(context: dg.OpExecutionContext, tags: dict[str, str]) -> None:
    """Tags are for finding runs in the UI, not part of the file's processing: a busy run
    storage (SQLite's `database is locked` under a backlog) costs a warning, not the file."""
    try:
        context.instance.add_run_tags(context.run_id, tags)
    except Exception as exc:
        context.log.warning(f"run tags not written ({type(exc).__name__}: {exc}); the file goes on")


def step_context(
    context: dg.OpExecutionContext, settings: Settings, progress_store: ProgressStoreResource, s3: S3Storage
) -> StepContext:
    """What a step is given, from the op's resources: this run as the claimant."""
    return StepContext(
        store=progress_store.open(),
        claimant=Claimant(context.run_id, run_is_alive(context.instance)),
        staging=settings.staging,
        client=s3.get_client(),
        bucket=s3.bucket,
        prefix=s3.prefix,
        error_dir=settings.config.processing.error_directory,
    )


def _snapshot(
    context: dg.OpExecutionContext,
    source_config: SourceConfig,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Iterator[dg.Output]:
    """Snapshot into staging + SHA-256 in one read; an unchanged or busy file stops here."""
    with failures(context, settings):
        ctx, cfg = step_context(context, settings, progress_store, s3), settings.config
        source = resolve_source(
            source_config.path,
            cfg.monitoring.watch_path,
            cfg.s3.incoming_prefix,
            ctx.client,
            source_config.relative_path,
            reserved=cfg.s3.reserved_folders(),
        )
        version = pipeline.take_snapshot(ctx, source, cfg.processing.max_file_bytes)
    if version.outcome is not ClaimOutcome.CLAIMED:
        log.info(events.skipped(version), extra=about(version.file_id))
        return
    if context.get_mapping_key() is None:  # a batch run's tags describe the batch, not one file
        tags = file_run_tags(source.relative_path, source.uri, version.file_id, source.metadata)
        tag_run(context, {**tags, SHA256_TAG: version.sha256[:12]})
    yield dg.Output(version, metadata={"sha256": version.sha256, "bytes": version.size, "fileId": version.file_id})


@dg.op(name=ProcessingStep.CHECKSUM_CALCULATION.value, out=dg.Out(FileVersion, is_required=False))
def checksum_calculation(
    context: dg.OpExecutionContext,
    config: SourceConfig,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Iterator[dg.Output]:
    """Snapshot into staging + SHA-256 in one read; an unchanged or busy file stops here."""
    yield from _snapshot(context, config, settings, progress_store, s3)


class BatchConfig(dg.Config):
    """The files a process_files_job run processes, each as process_file_job's config."""

    files: list[SourceConfig] = Field(description="the files, in order; each gets its own steps")


@dg.op(name=BATCH_OP, out=dg.DynamicOut(dict))
def batch_files(config: BatchConfig) -> Iterator[dg.DynamicOutput]:
    """One mapped branch of the seven steps per file: a failure stays in its file's branch."""
    for index, source in enumerate(config.files):
        key = mapping_key(index, source.relative_path or source.path)
        yield dg.DynamicOutput(source.model_dump(), mapping_key=key)


@dg.op(out=dg.Out(FileVersion, is_required=False))
def checksum_of_batch_entry(
    context: dg.OpExecutionContext,
    source: dict,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Iterator[dg.Output]:
    """`checksum_calculation` for one file of a batch (its source is an input, not config)."""
    yield from _snapshot(context, SourceConfig(**source), settings, progress_store, s3)


@dg.op(name=ProcessingStep.TYPE_DETECTION.value)
def type_detection(
    context: dg.OpExecutionContext,
    version: FileVersion,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Detection:
    with failures(context, settings):
        detection = pipeline.detect_type(step_context(context, settings, progress_store, s3), version)
    log.info(
        "%s: %s (%s)",
        version.source.relative_path,
        detection.file_type.value,
        detection.kind,
        extra=about(version.file_id),
    )
    if context.get_mapping_key() is None:
        tag_run(context, {FILE_TYPE_TAG: detection.kind})
    return detection


@dg.op(name=ProcessingStep.ARCHIVE_EXTRACTION.value)
def archive_extraction(
    context: dg.OpExecutionContext,
    version: FileVersion,
    detection: Detection,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> list[WorkItem]:
    with failures(context, settings):
        items = pipeline.plan_work(step_context(context, settings, progress_store, s3), version, detection)
    if len(items) > 1 or items[0].file_id != version.file_id:
        log.info("%s: %d entries extracted", version.source.relative_path, len(items), extra=about(version.file_id))
    return items


@dg.op(name=ProcessingStep.PARQUET_CONVERSION.value)
def parquet_conversion(
    context: dg.OpExecutionContext,
    version: FileVersion,
    items: list[WorkItem],
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> list[PreparedItem]:
    with failures(context, settings):
        ctx = step_context(context, settings, progress_store, s3)
        landing = pipeline.landing(ctx, on_landed=partial(_landed, context, s3))
        prepared = pipeline.convert_items(ctx, version, items, ConversionRecipe.of(settings.config.processing), landing)
    for line in events.conversion_summary(prepared):
        log.info(line, extra=about(version.file_id))
    return prepared


@dg.op(name=ProcessingStep.S3_UPLOAD.value, pool=UPLOAD_POOL)
def streaming(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> list[UploadedObject]:
    """Upload what the conversion did not land; one materialization per object as it lands."""
    uploaded = []
    with failures(context, settings):
        for obj in pipeline.upload_items(step_context(context, settings, progress_store, s3), version, prepared):
            uploaded.append(obj)
            if not obj.ahead:  # the conversion step reported those as they landed
                _landed(context, s3, obj)
    ahead = sum(o.ahead for o in uploaded)
    reused = sum(o.reused for o in uploaded) - ahead
    log.info(
        "%s: %d objects uploaded, %d landed during the conversion, %d already in S3",
        version.source.relative_path,
        len(uploaded) - reused - ahead,
        ahead,
        reused,
        extra=about(version.file_id),
    )
    return uploaded


def _landed(context: dg.OpExecutionContext, s3: S3Storage, obj: UploadedObject) -> None:
    """One materialization per object in S3; called from upload threads too (Dagster's event
    log takes events from any thread of the step)."""
    context.log_event(events.object_landed(obj, s3.prefix, s3.uri(obj.key)))


@dg.op(name=ProcessingStep.INTEGRITY_VERIFICATION.value)
def integrity_verification(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    uploaded: list[UploadedObject],
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> list[PreparedItem]:
    with failures(context, settings):
        manifests = pipeline.verify_items(step_context(context, settings, progress_store, s3), version, prepared)
    log.info(
        "%s: %d objects verified, %d datasets committed",
        version.source.relative_path,
        len(uploaded),
        len(manifests),
        extra=about(version.file_id),
    )
    return prepared


@dg.op(name=ProcessingStep.PROGRESS_UPDATE.value)
def progress_update(
    context: dg.OpExecutionContext,
    version: FileVersion,
    prepared: list[PreparedItem],
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> None:
    store = progress_store.open()
    keep = settings.config.processing.staging_retention.total_seconds() > 0
    with failures(context, settings):
        status = pipeline.finish(step_context(context, settings, progress_store, s3), version, prepared, not keep)
    for item in prepared:
        context.log_event(
            events.file_completed(item, version, store.require(item.item.file_id), s3.prefix, s3.uri(item.key))
        )
    log.info(
        "%s: COMPLETED -> %s",
        version.source.relative_path,
        s3.uri(status.output_key or ""),
        extra=about(version.file_id, s3Key=status.output_key),
    )


@dg.failure_hook(required_resource_keys={"progress_store", "settings", "s3"})
def mark_failed(context: dg.HookContext) -> None:
    """After an op's last retry: FAILED with the step and the reason, uploads given up,
    the original parked in the error directory (`pipeline.give_up`). The file is the one
    the run's config names, located as its first step located it: never a run tag, which
    a file's metadata could otherwise forge."""
    error = context.op_exception
    message = getattr(error, "description", None) or (str(error) if error else "unknown error")
    cfg = context.resources.settings.config
    run = context.instance.get_run_by_id(context.run_id)
    files = files_of_run(run, cfg.monitoring.watch_path, cfg.s3.incoming_prefix) if run else []
    key = context.step_key.partition("[")[2].rstrip("]")
    file = files[index_of(key)] if key and files else (files[0] if files else None)
    gave_up = pipeline.give_up(
        context.resources.progress_store.open(),
        context.resources.s3,  # a hook gets what the resource creates: the boto3 client
        context.run_id,
        file.file_id if file else None,
        file.path if file else None,
        f"{context.op.name}: {message}",
        cfg.monitoring.watch_path,
        cfg.processing.error_directory,
    )
    context.log.error(events.gave_up_message(file.relative_path if file else "", context.op.name, message, gave_up))
