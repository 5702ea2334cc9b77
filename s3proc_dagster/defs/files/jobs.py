"""`process_file_job`: one run per file, one op per ProcessingStep, in the seed's order.

The job runs in-process: its steps are sequential by nature, and a process per step
would cost about a second and 170 MB each. Parallelism comes from running several files
at once (the run queue's MAX_CONCURRENCY). Outputs between steps are persisted by the
filesystem I/O manager, so "Re-execute from failure" reloads them instead of redoing
earlier steps.
"""

import dagster as dg

from s3proc_dagster.defs.files.ops import (
    archive_extraction,
    checksum_calculation,
    integrity_verification,
    mark_failed,
    parquet_conversion,
    progress_update,
    reconcile,
    streaming,
    type_detection,
)


def retry_policy(max_retries: int, retry_delay_ms: int) -> dg.RetryPolicy:
    """MAX_RETRIES attempts after the first, RETRY_DELAY_MS doubling each time."""
    return dg.RetryPolicy(
        max_retries=max_retries,
        delay=retry_delay_ms / 1000,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


def build_process_file_job(policy: dg.RetryPolicy) -> dg.JobDefinition:
    @dg.job(
        name="process_file_job",
        description="Snapshot, detect, extract, convert, upload, verify and record one file.",
        executor_def=dg.in_process_executor,
        hooks={mark_failed},
        op_retry_policy=policy,
        tags={"s3proc/job": "files"},
    )
    def process_file_job() -> None:
        version = checksum_calculation()
        detection = type_detection(version)
        items = archive_extraction(version, detection)
        prepared = parquet_conversion(version, items)
        uploaded = streaming(version, prepared)
        verified = integrity_verification(version, prepared, uploaded)
        progress_update(version, verified)

    return process_file_job


@dg.job(
    name="reconcile_job",
    description=(
        "Crash recovery: report dead runs failed, settle the files they held (COMPLETED if S3 proves "
        "the version whole, else back to PENDING), abort abandoned multipart uploads."
    ),
    executor_def=dg.in_process_executor,
    tags={"s3proc/job": "recovery"},
)
def reconcile_job() -> None:
    reconcile()


reconcile_schedule = dg.ScheduleDefinition(
    name="reconcile_schedule",
    job=reconcile_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: the upload sweep, and recovery of anything the watch sensor did not request.",
)
