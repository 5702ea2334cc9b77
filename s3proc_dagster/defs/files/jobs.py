"""The file jobs (one op per ProcessingStep, over one file or a batch) and `reconcile_job` (crash recovery).

A run's steps run in one process (the code location's in-process executor): they are
sequential by nature, and a process per step would cost about a second and 170 MB each.
Parallelism comes from running several runs at once (the run queue's MAX_CONCURRENCY).
Outputs between steps are persisted by the I/O manager, so "Re-execute from failure"
reloads them instead of redoing earlier steps. Retries come from the settings at run
time (`steps.run_step`), not from the definitions.
"""

from typing import Any

import dagster as dg

from s3proc_dagster import recovery
from s3proc_dagster.defs.files import events
from s3proc_dagster.defs.files.ops import (
    archive_extraction,
    checksum_calculation,
    integrity_verification,
    parquet_conversion,
    progress_update,
    streaming,
    type_detection,
)
from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.files.staging import SWEEP_GRACE_S
from s3proc_dagster.models import ProcessingStatus
from s3proc_dagster.names import (
    ASSET_JOB,
    IMAGE_REQUEST_JOB,
    JOB_TAG,
    PROCESS_FILE_JOB,
    PROCESS_FILES_JOB,
    RECONCILE_JOB,
    REPORTS_JOB,
)
from s3proc_dagster.pipeline import after_success
from s3proc_dagster.runs.batching import files_of_run, zone_of_run
from s3proc_dagster.runs.liveness import reap_dead_runs, run_is_alive
from s3proc_dagster.settings import Configuration
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.keys import prefix_folder
from s3proc_dagster.zones.declared import declared_directories, declared_prefixes

# (ASSET_JOB: a zone's file materialized from the catalog, and the reports)
PRODUCT_JOBS = [PROCESS_FILE_JOB, PROCESS_FILES_JOB, ASSET_JOB, IMAGE_REQUEST_JOB, RECONCILE_JOB, REPORTS_JOB]


def file_steps(files: Any) -> Any:
    """The six steps after the snapshot, each over the run's files: the same in both jobs
    and in a zone's asset."""
    return progress_update(
        integrity_verification(streaming(parquet_conversion(archive_extraction(type_detection(files)))))
    )


@dg.job(
    name=PROCESS_FILE_JOB,
    description="Snapshot, detect, extract, convert, upload, verify and record one file.",
    tags={JOB_TAG: "files"},
)
def process_file_job() -> None:
    file_steps(checksum_calculation())


@dg.job(
    name=PROCESS_FILES_JOB,
    description=(
        "process_file_job's steps, each over several small files: each file has its own records, "
        "assets and failure, and one that keeps failing leaves for a run of its own. The sensors "
        "start it under a backlog (runs/batching.py)."
    ),
    tags={JOB_TAG: "files"},
)
def process_files_job() -> None:
    file_steps(checksum_calculation())


def _lineage_started(instance: dg.DagsterInstance, record: dg.RunRecord) -> float:
    """When the work of a dead run began: its own start, or for a re-execution the start of
    the run it re-executes first of all (`root_run_id`).

    Crash recovery sets PENDING again a file its dead run never reached, unless the file
    changed after that run started (`recovery.requeue_abandoned`). A re-execution works on
    files its first run claimed: those were COMPLETED by that run, or settled by recovery
    when it died, before the re-execution began, so measured from the re-execution's own
    start every such COMPLETED file looked untouched and was set PENDING and processed once
    more by a run of its own."""
    run = record.dagster_run
    first = instance.get_run_record_by_id(run.root_run_id) if run.root_run_id else None
    origin = first or record
    return origin.start_time or origin.create_timestamp.timestamp()


def _landing(
    context: dg.OpExecutionContext, item: recovery.Recovered, store: ProgressStore, s3: S3Storage, cfg: Configuration
) -> dg.AssetMaterialization | None:
    """The catalog's record of a file recovery COMPLETED (its run died after the commit, so no
    step materialized it), placed as its run would have: by the dead run's config (its zone,
    its path below the source). None for a file that run does not name (an archive's entry)."""
    run = context.instance.get_run_by_id(item.dead_run) if item.dead_run else None
    if run is None:
        return None
    named = [
        f for f in files_of_run(run, cfg.monitoring.watch_path, cfg.s3.incoming_prefix) if f.file_id == item.file_id
    ]
    record = store.get(item.file_id)
    if not named or record is None or not record.output_key:
        return None
    zone = zone_of_run(run)
    catalog = events.Catalog(zone.get("S3_PREFIX", cfg.s3.prefix), zone.get("ZONE_NAME", ""))
    return events.file_recovered(record, catalog, named[0].relative_path, s3.uri(record.output_key))


@dg.op(tags={"step": "crash_recovery"})
def reconcile(
    context: dg.OpExecutionContext, settings: Settings, progress_store: ProgressStoreResource, s3: S3Storage
) -> None:
    """Fail runs whose worker is gone, then `recovery.reconcile`: their files, abandoned
    uploads and staging no file needs."""
    cfg = settings.config
    dead = []
    for record in reap_dead_runs(context.instance, PRODUCT_JOBS, exclude_run_id=context.run_id):
        run = record.dagster_run
        context.log.info(f"run {run.run_id}: its worker is gone; reported failed")
        started = _lineage_started(context.instance, record)
        files = files_of_run(run, cfg.monitoring.watch_path, cfg.s3.incoming_prefix)
        dead += [recovery.DeadRun(run.run_id, started, f.file_id, f.path) for f in files]
    incoming, store = prefix_folder(cfg.s3.incoming_prefix), progress_store.open()
    report = recovery.reconcile(
        store,
        s3.get_client(),
        cfg.s3.bucket,
        cfg.s3.prefix,
        run_is_alive(context.instance, context.run_id),
        dead,
        cfg.processing.staging_directory,
        cfg.processing.stale_upload_age.total_seconds(),
        max(cfg.processing.staging_retention.total_seconds(), SWEEP_GRACE_S),
        (incoming,) if incoming and cfg.s3.incoming_bucket_name == cfg.s3.bucket else (),
    )
    for source in report.requeued:
        context.log.info(f"{source}: its run died before processing it; PENDING again for the sensor")
    for item in report.settled:
        context.log.info(
            f"{item.file_path}: {item.outcome.name} (aborted {item.aborted_uploads} uploads, deleted {item.deleted_objects} objects)"
        )
        if item.outcome is ProcessingStatus.COMPLETED and (landed := _landing(context, item, store, s3, cfg)):
            context.log_event(landed)
    roots = (cfg.monitoring.watch_path, *declared_directories(), *declared_prefixes(), cfg.s3.incoming_uri)
    for line in after_success.finish_pending(store, s3.get_client(), cfg.s3.bucket, roots):
        context.log.info(f"after success, finished by recovery: {line}")
    for key in report.aborted_uploads:
        context.log.info(f"s3://{cfg.s3.bucket}/{key}: abandoned multipart upload aborted")
    if report.staging.entries:
        context.log.info(
            f"staging: {report.staging.entries} entries no file needs removed ({report.staging.bytes} bytes)"
        )


@dg.job(
    name=RECONCILE_JOB,
    description=(
        "Crash recovery: report dead runs failed, settle the files they held (COMPLETED if S3 proves "
        "the version whole, else back to PENDING), abort abandoned multipart uploads, clean staging."
    ),
    tags={JOB_TAG: "recovery"},
)
def reconcile_job() -> None:
    reconcile()


reconcile_schedule = dg.ScheduleDefinition(
    name="reconcile_schedule",
    job=reconcile_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: the upload and staging sweeps, and recovery the sensor has not asked for.",
)
