"""`reports_job` and the sensor that refreshes the reports after files settle."""

import dagster as dg

from s3proc_dagster.defs.reports.assets import GROUP
from s3proc_dagster.defs.resources import ProgressStoreResource, Settings
from s3proc_dagster.models import ProcessingStatus

reports_job = dg.define_asset_job("reports_job", selection=dg.AssetSelection.groups(GROUP))


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
    files = progress_store.open().list_files()
    settled = [f.last_updated_at for f in files if f.status in (ProcessingStatus.COMPLETED, ProcessingStatus.FAILED)]
    latest = max(settled).isoformat() if settled else ""
    if not latest or latest == context.cursor:
        return dg.SkipReason("no file settled since the last refresh")
    context.update_cursor(latest)
    return dg.RunRequest(run_key=f"reports-{latest}")
