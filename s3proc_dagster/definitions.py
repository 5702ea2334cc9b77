"""The code location: one `dg.Definitions` with every job, sensor and resource."""

from __future__ import annotations

import dagster as dg

from s3proc_dagster.defs.files.jobs import build_process_file_job, reconcile_job, reconcile_schedule, retry_policy
from s3proc_dagster.defs.files.sensors import build_s3_incoming_sensor, build_watch_sensor
from s3proc_dagster.defs.images.ops import image_request_job
from s3proc_dagster.defs.reports import build_report_defs, build_reports_sensor, reports_job
from s3proc_dagster.defs.resources import build_resources
from s3proc_dagster.logs import configure_logging
from s3proc_dagster.settings import load_configuration

config = load_configuration()
configure_logging(config.logging)

process_file_job = build_process_file_job(
    retry_policy(config.processing.max_retries, config.processing.retry_delay_ms)
)
watch_directory_sensor = build_watch_sensor(
    [process_file_job, image_request_job, reconcile_job], config.monitoring.poll_interval_ms
)
s3_incoming_sensor = build_s3_incoming_sensor(
    process_file_job, bool(config.s3.incoming_prefix), config.monitoring.poll_interval_ms
)

report_assets, report_checks = build_report_defs()

defs = dg.Definitions(
    # One process per run: steps of a file are sequential, and the reports share one
    # DuckDB file, which allows a single writing process at a time.
    executor=dg.in_process_executor,
    assets=report_assets,
    asset_checks=report_checks,
    jobs=[process_file_job, image_request_job, reconcile_job, reports_job],
    sensors=[watch_directory_sensor, s3_incoming_sensor, build_reports_sensor(config.processing.reports_auto_refresh)],
    schedules=[reconcile_schedule],
    resources=build_resources(config),
)
