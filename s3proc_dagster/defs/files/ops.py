"""One op per ProcessingStep, named by it, over all the files of its run.

`process_file_job` runs them over one file, `process_files_job` over a batch: the same
ops, so a file's steps, records, materializations and failure are the same in either.
Each body is resources in, one `pipeline` call per file (`steps.run_step` sorts out what
a failure costs the file), events out.
"""

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial

import dagster as dg

from s3proc_dagster import pipeline
from s3proc_dagster.defs.files import events
from s3proc_dagster.defs.files.steps import FilesConfig, in_batch, run_settings, run_step, tag_run
from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.errors import RecordNotFound, s3_error_code
from s3proc_dagster.files.globs import admitted
from s3proc_dagster.logs import about, get_logger, progress_logger
from s3proc_dagster.models import ProcessingStep
from s3proc_dagster.names import FILE_TYPE_TAG, SHA256_TAG, UPLOAD_POOL, ZONE_TAG
from s3proc_dagster.pipeline import ConversionRecipe, StepContext, UploadedObject, after_success
from s3proc_dagster.pipeline.batch import FileInRun, Outcome
from s3proc_dagster.pipeline.snapshot import held_version, settled_since
from s3proc_dagster.runs.batching import zone_materialized
from s3proc_dagster.runs.tags import file_run_tags
from s3proc_dagster.settings import Configuration
from s3proc_dagster.sources.resolve import locate, resolve_source
from s3proc_dagster.stores.base import ClaimOutcome
from s3proc_dagster.transfer.keys import is_s3_uri, split_uri
from s3proc_dagster.transfer.verify import head
from s3proc_dagster.zones.declared import watched_below

log = get_logger("steps")
progress = progress_logger("steps")
Files = list[FileInRun]


def _snapshot(context: dg.OpExecutionContext, settings: Settings, ctx: StepContext, file: FileInRun) -> FileInRun:
    cfg = settings.config
    try:
        source = resolve_source(
            file.path,
            cfg.monitoring.watch_path,
            cfg.s3.incoming_prefix,
            ctx.client,
            file.relative_path,
            reserved=cfg.s3.reserved_folders(),
            zone=cfg.zone.name,
            watched=watched_below(cfg.s3.bucket, cfg.s3.prefix, cfg.zone.name),
        )
    except RecordNotFound as exc:  # gone: settled by another run since this one was requested, or FAILED
        located = locate(
            file.path, cfg.monitoring.watch_path, cfg.s3.incoming_prefix, file.relative_path, cfg.zone.name
        )
        return _settled_elsewhere(context, ctx, file, located.relative_path, located.file_id, exc)
    try:
        version = held_version(ctx, source) or pipeline.take_snapshot(ctx, source, cfg.processing.max_file_bytes)
    except Exception as exc:
        if not (isinstance(exc, FileNotFoundError) or s3_error_code(exc) in ("NoSuchKey", "404")):
            raise
        return _settled_elsewhere(context, ctx, file, source.relative_path, source.file_id, exc)
    if version.outcome is not ClaimOutcome.CLAIMED:
        log.info(events.skipped(version), extra=about(version.file_id))
        if version.outcome is ClaimOutcome.UNCHANGED:  # the same bytes dropped again: the zone's action
            after_success.again(  # applies to this copy too
                ctx.store, ctx.client, ctx.bucket, version.file_id, cfg.zone.after_success, _sources(cfg)
            )
        return replace(file, version=version).out(Outcome.SKIPPED)
    if not in_batch(context):  # a run started without the sensor's tags gets them here
        tags = file_run_tags(source.relative_path, source.uri, version.file_id, source.metadata)
        zone = {ZONE_TAG: cfg.zone.name} if cfg.zone.name else {}  # a partition materialized from the catalog
        tag_run(context, {**tags, **zone, SHA256_TAG: version.sha256[:12]})
    return replace(file, version=version)


def _settled_elsewhere(
    context: dg.OpExecutionContext,
    ctx: StepContext,
    file: FileInRun,
    relative_path: str,
    file_id: str,
    exc: BaseException,
) -> FileInRun:
    """A file gone from its path is SKIPPED when another run settled it after this run was
    requested (two requests raced for it, and the other landed and deleted or moved it, or
    parked it); otherwise its absence (`exc`) is this run's error."""
    requested = context.instance.get_run_record_by_id(context.run_id)
    settled = requested and settled_since(ctx, file_id, requested.create_timestamp)
    if not settled:
        raise exc
    log.info(events.settled_elsewhere(relative_path, settled), extra=about(file_id))
    return file.out(Outcome.SKIPPED)


@dg.op(name=ProcessingStep.CHECKSUM_CALCULATION.value, out=dg.Out(Files, is_required=False))
def checksum_calculation(
    context: dg.OpExecutionContext,
    config: FilesConfig,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Iterator[dg.Output]:
    """Snapshot into staging + SHA-256 in one read, then the claim; an unchanged or busy file stops here."""
    settings = run_settings(context, settings)
    materialized = None if config.path or config.files else zone_materialized(context.dagster_run)
    if materialized:  # a zone's partition, from the catalog's Materialize
        zone, source = materialized
        tag_run(context, {ZONE_TAG: zone.name})  # found by its zone, whatever becomes of the file
        _admitted(zone.name, source["relative_path"], settings.config)
        _still_there(zone.name, source["relative_path"], source["path"], s3)
    files = [FileInRun(s.path, s.relative_path) for s in config.sources(materialized[1] if materialized else None)]
    done = run_step(context, settings, progress_store, s3, files, partial(_snapshot, context, settings))
    if any(f.in_run for f in done):  # otherwise every later step has nothing to do: they are skipped
        yield dg.Output(done, metadata={"files": len(done), "to process": sum(f.in_run for f in done)})


def _sources(cfg: Configuration) -> tuple:
    """Where the run's files come from, for what after_success keeps of their paths."""
    return (cfg.monitoring.watch_path, *([cfg.s3.incoming_uri] if cfg.s3.incoming_uri else []))


def _admitted(zone: str, relative_path: str, cfg: Configuration) -> None:
    """A partition added by hand for a path the zone's globs leave out is refused, as its
    sensor and `s3proc process` leave the file out: the zone's rules are not for it."""
    if not admitted(relative_path, cfg.zone.include, cfg.zone.exclude):
        raise dg.Failure(
            description=f"zone {zone}: {relative_path} is left out by its include {list(cfg.zone.include)} "
            f"and exclude {list(cfg.zone.exclude)} globs, so it is not landed; nothing was touched",
            allow_retries=False,
        )


def _still_there(zone: str, relative_path: str, where: str, s3: S3Storage) -> None:
    """A file's partition materialized from the catalog once the file is gone (deleted or
    moved after success, or by its producer) fails here, before anything of it is touched:
    its landings stay as they are, and nothing is FAILED or parked."""
    if is_s3_uri(where):
        bucket, key = split_uri(where)
        present = head(s3.get_client(), bucket, key) is not None
    else:
        present = os.path.lexists(where)
    if not present:
        raise dg.Failure(
            description=f"zone {zone}: {relative_path} is no longer at {where}, so there is nothing to land; "
            "its landings stay as they are. Put the file back (or a new version) to land it again.",
            allow_retries=False,
        )


def _detect(ctx: StepContext, file: FileInRun) -> FileInRun:
    assert file.version is not None
    detection = pipeline.detect_type(ctx, file.version)
    kind, file_type = detection.kind, detection.file_type
    shown = file_type.value if kind == file_type.value else f"{kind}, {file_type.value}"
    progress.info("%s: %s (%s)", file.name, shown, file_type.meaning, extra=about(file.version.file_id))
    return replace(file, detection=detection)


@dg.op(name=ProcessingStep.TYPE_DETECTION.value)
def type_detection(
    context: dg.OpExecutionContext,
    files: Files,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Files:
    settings = run_settings(context, settings)
    done = run_step(context, settings, progress_store, s3, files, _detect)
    if not in_batch(context) and done[0].detection is not None:
        tag_run(context, {FILE_TYPE_TAG: done[0].detection.kind})
    return done


def _extract(ctx: StepContext, file: FileInRun) -> FileInRun:
    assert file.version is not None and file.detection is not None
    items = pipeline.plan_work(ctx, file.version, file.detection)
    if len(items) > 1 or items[0].file_id != file.version.file_id:
        progress.info("%s: %d entries extracted", file.name, len(items), extra=about(file.version.file_id))
    return replace(file, items=tuple(items))


@dg.op(name=ProcessingStep.ARCHIVE_EXTRACTION.value)
def archive_extraction(
    context: dg.OpExecutionContext,
    files: Files,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Files:
    settings = run_settings(context, settings)
    return run_step(context, settings, progress_store, s3, files, _extract)


def _convert(
    context: dg.OpExecutionContext,
    landed: Callable,
    recipe: ConversionRecipe,
    drift: tuple[list[tuple[str, str]] | None, bool],
    ctx: StepContext,
    file: FileInRun,
) -> FileInRun:
    assert file.version is not None
    landing = pipeline.landing(ctx, on_landed=landed)
    prepared = pipeline.convert_items(ctx, file.version, list(file.items), recipe, landing, *drift)
    for line in events.conversion_summary(prepared):
        log.info(line, extra=about(file.version.file_id))
    return replace(file, prepared=tuple(prepared))


@dg.op(name=ProcessingStep.PARQUET_CONVERSION.value)
def parquet_conversion(
    context: dg.OpExecutionContext,
    files: Files,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Files:
    settings = run_settings(context, settings)
    recipe = ConversionRecipe.of(settings.config)
    landed = partial(_landed, context, s3, events.Catalog.of(settings.config))
    zone = settings.config.zone
    before = events.zone_columns(context.instance, zone.name) if zone.name and zone.schema_drift != "off" else None
    drift = (before, zone.schema_drift == "blocking")
    return run_step(context, settings, progress_store, s3, files, partial(_convert, context, landed, recipe, drift))


def _upload(context: dg.OpExecutionContext, landed: Callable, ctx: StepContext, file: FileInRun) -> FileInRun:
    assert file.version is not None
    uploaded, items = [], {p.item.file_id: p for p in file.prepared}
    for obj in pipeline.upload_items(ctx, file.version, list(file.prepared)):
        uploaded.append(obj)
        if not obj.ahead and events.shows_chunks(items[obj.file_id]):  # those that landed ahead are reported
            landed(obj)
    ahead = sum(o.ahead for o in uploaded)
    reused = sum(o.reused for o in uploaded) - ahead
    progress.info(
        "%s: %d objects uploaded, %d landed during the conversion, %d already in S3",
        file.name,
        len(uploaded) - reused - ahead,
        ahead,
        reused,
        extra=about(file.version.file_id),
    )
    return replace(file, uploaded=tuple(uploaded))


@dg.op(name=ProcessingStep.S3_UPLOAD.value, pool=UPLOAD_POOL)
def streaming(
    context: dg.OpExecutionContext,
    files: Files,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Files:
    """Upload what the conversion did not land; a materialization per chunk of a dataset of several."""
    settings = run_settings(context, settings)
    landed = partial(_landed, context, s3, events.Catalog.of(settings.config))
    return run_step(context, settings, progress_store, s3, files, partial(_upload, context, landed))


def _landed(context: dg.OpExecutionContext, s3: S3Storage, catalog: events.Catalog, obj: UploadedObject) -> None:
    """One materialization per chunk in S3; called from upload threads too (Dagster's event
    log takes events from any thread of the step)."""
    context.log_event(events.object_landed(obj, catalog, s3.uri(obj.key)))


def _verify(ctx: StepContext, file: FileInRun) -> FileInRun:
    assert file.version is not None
    manifests = pipeline.verify_items(ctx, file.version, list(file.prepared))
    progress.info(
        "%s: %d objects verified, %d datasets committed",
        file.name,
        len(file.uploaded),
        len(manifests),
        extra=about(file.version.file_id),
    )
    return file


@dg.op(name=ProcessingStep.INTEGRITY_VERIFICATION.value)
def integrity_verification(
    context: dg.OpExecutionContext,
    files: Files,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Files:
    settings = run_settings(context, settings)
    return run_step(context, settings, progress_store, s3, files, _verify)


def _finish(
    context: dg.OpExecutionContext,
    s3: S3Storage,
    catalog: events.Catalog,
    release: bool,
    drift: bool,
    cfg: Configuration,
    ctx: StepContext,
    file: FileInRun,
) -> FileInRun:
    assert file.version is not None
    zone = cfg.zone
    status = pipeline.finish(ctx, file.version, list(file.prepared), release, zone.after_success)
    if status.after_success:  # delete or move the original, now that its version is committed
        status = ctx.store.require(status.file_id)
        after_success.apply(ctx.store, ctx.client, ctx.bucket, status, _sources(cfg))
    for item in file.prepared:
        record = ctx.store.require(item.item.file_id)
        context.log_event(events.file_completed(item, file.version, record, catalog, s3.uri(item.key)))
        key, partition = catalog.place(item.item.relative_path)
        if partition is not None:
            passed = f"{item.item.relative_path}: version {file.version.sha256[:12]} landed"
            context.log_event(events.landed_check(key, partition, passed=True, description=passed))
            if drift and item.is_tabular:
                context.log_event(events.drift_check(key, partition, item))
    # a zone's run log already holds the landing as its materialization and checks: the line
    # goes to the product's log only (`logs.progress_logger`), not a row more a file
    (progress if catalog.zone else log).info(
        "%s: COMPLETED -> %s",
        file.name,
        s3.uri(status.output_key or ""),
        extra=about(file.version.file_id, s3Key=status.output_key),
    )
    return file


@dg.op(name=ProcessingStep.PROGRESS_UPDATE.value, out=dg.Out(dg.Nothing, is_required=False))
def progress_update(
    context: dg.OpExecutionContext,
    files: Files,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
) -> Iterator[dg.Output]:
    """Record each file COMPLETED, and its materializations. Its output is never yielded:
    in a zone's asset (`components.landing_zone`) it stands for the asset, whose
    materializations are the files' own (`events.file_completed`), not one more from Dagster."""
    settings = run_settings(context, settings)
    release = not settings.config.processing.staging_retention.total_seconds()
    catalog = events.Catalog.of(settings.config)
    if catalog.zone:  # a zone's partitions are its files' paths, registered as they land
        paths = [p.item.relative_path for f in files if f.in_run for p in f.prepared]
        context.instance.add_dynamic_partitions(events.zone_partitions(catalog.zone), paths)
    drift = settings.config.zone.schema_drift != "off"
    finish = partial(_finish, context, s3, catalog, release, drift, settings.config)
    run_step(context, settings, progress_store, s3, files, finish)
    yield from ()
