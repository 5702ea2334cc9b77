"""`reports_job` and the sensor that refreshes the reports after files settle."""

import dagster as dg

from s3proc_dagster.defs.reports.assets import GROUP
from s3proc_dagster.defs.resources import ProgressStoreResource, Settings
from s3proc_dagster.models import ProcessingStatus
from s3proc_dagster.names import REPORTS_JOB
from s3proc_dagster.runs.liveness import IN_FLIGHT
from s3proc_dagster.runs.requests import CONSOLE_LOGGER

reports_job = dg.define_asset_job(REPORTS_JOB, selection=dg.AssetSelection.groups(GROUP))


@dg.sensor(
    name="reports_refresh_sensor",
    job=reports_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def reports_refresh_sensor(
    context: dg.SensorEvaluationContext, settings: Settings, progress_store: ProgressStoreResource
) -> dg.RunRequest | dg.SkipReason:
    """Refresh the reports after files complete or fail (at most once a minute; off with REPORTS_AUTO_REFRESH=false)."""
    if not settings.config.processing.reports_auto_refresh:
        return dg.SkipReason("REPORTS_AUTO_REFRESH is false")
    busy = context.instance.get_run_records(
        dg.RunsFilter(job_name=reports_job.name, statuses=[*IN_FLIGHT, dg.DagsterRunStatus.QUEUED]), limit=1
    )
    if busy:
        # One refresh at a time: the files that settle meanwhile are in the next one (the
        # cursor stays put), so a backlog does not queue a refresh per minute.
        return dg.SkipReason(f"reports_job run {busy[0].dagster_run.run_id} has not finished yet")
    files = progress_store.open().list_files()
    settled = [f.last_updated_at for f in files if f.status in (ProcessingStatus.COMPLETED, ProcessingStatus.FAILED)]
    latest = max(settled).isoformat() if settled else ""
    if not latest or latest == context.cursor:
        return dg.SkipReason("no file settled since the last refresh")
    context.update_cursor(latest)
    return dg.RunRequest(run_key=f"reports-{latest}", run_config=CONSOLE_LOGGER)
