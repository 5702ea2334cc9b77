"""Resources: the progress store, S3 (dagster-aws) and the pipeline's non-secret settings.

Secrets reach resources only through `dg.EnvVar`, so the Dagster UI shows the variable's
name, never its value, and no op reads a credential itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from s3proc_dagster.runs.liveness import Heartbeat
from s3proc_dagster.settings import Configuration
from s3proc_dagster.transfer.client import make_client
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.stores.base import ProgressStore


class ProgressStoreResource(dg.ConfigurableResource):
    """SQLite at `progress_db_path`, or MongoDB when `mongodb_uri` is set.

    The store is opened once per run process and closed at teardown; state lives in the
    store, never in the resource, so any number of run processes can share it. Inside a
    run the resource also beats the run's heartbeat: the store's claims are held by runs,
    and a claim is only as good as its run's liveness (`runs.liveness`).
    """

    progress_db_path: str
    mongodb_uri: str = ""
    mongodb_database: str = "s3proc"

    _store: ProgressStore | None = PrivateAttr(default=None)
    _heartbeat: Heartbeat | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.run_id and context.instance is not None:
            self._heartbeat = Heartbeat(context.instance, context.run_id).start()

    def open(self) -> ProgressStore:
        if self._store is None:
            if self.mongodb_uri:
                from s3proc_dagster.stores.mongo import MongoProgressStore

                self._store = MongoProgressStore(self.mongodb_uri, self.mongodb_database)
            else:
                from s3proc_dagster.stores.sqlite import SQLiteProgressStore

                self._store = SQLiteProgressStore(self.progress_db_path)
        return self._store

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._store is not None:
            self._store.close()
            self._store = None


class S3Storage(S3Resource):
    """dagster-aws's S3 resource, plus the bucket, the key prefix and path-style addressing
    that S3-compatible servers (SeaweedFS, MinIO) need."""

    bucket: str
    prefix: str = ""
    force_path_style: bool = True
    public_base_url: str = ""
    incoming_bucket: str = ""
    incoming_prefix: str = ""

    def get_client(self) -> Any:
        return make_client(
            self.endpoint_url,
            self.region_name or "us-east-1",
            self.aws_access_key_id,
            self.aws_secret_access_key,
            self.force_path_style,
            self.max_attempts,
            self.aws_session_token,
        )

    def key(self, *parts: str) -> str:
        """A key under the configured prefix."""
        return join_key(self.prefix, *parts)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class PipelineSettings(dg.ConfigurableResource):
    """The non-secret processing settings ops need, visible in the UI's resource page."""

    watch_path: str
    staging_directory: str
    error_directory: str
    chunk_size: int = 50000
    parquet_compression: str = "ZSTD"
    max_retries: int = 3
    retry_delay_ms: int = 1000
    stability_threshold_ms: int = 2000
    ignore_initial: bool = False
    validation_rules_dir: str = ""
    validation_as_of: str = ""
    csv_null_strings: list[str] = Field(default_factory=lambda: [""])  # CSV_NULL_STRINGS; [""]: DuckDB's default
    s3_list_page_size: int = 1000
    s3_list_pages_per_tick: int = 5
    stale_upload_age_s: float = 3600
    staging_retention_s: float = 0

    @property
    def staging(self) -> Path:
        return Path(self.staging_directory)


class ImageSettings(dg.ConfigurableResource):
    """Seed 002's image options (IMAGE_*), visible in the UI's resource page."""

    quality: int = 50
    output_format: str = ""
    fetch_timeout_ms: int = 15000
    max_bytes: int = 25 * 1024 * 1024
    webhook_url: str = ""
    max_retries: int = 3
    retry_delay_ms: int = 1000
    allow_private_urls: bool = False


def build_resources(cfg: Configuration) -> dict[str, Any]:
    """Resources for `Definitions`, from the validated settings."""
    return {
        "progress_store": ProgressStoreResource(
            progress_db_path=str(cfg.processing.progress_db_path),
            mongodb_uri=dg.EnvVar("MONGODB_URI") if cfg.processing.uses_mongodb else "",
            mongodb_database=cfg.processing.mongodb_database,
        ),
        "s3": S3Storage(
            bucket=cfg.s3.bucket,
            prefix=cfg.s3.prefix,
            region_name=cfg.s3.region,
            endpoint_url=cfg.s3.endpoint or None,
            force_path_style=cfg.s3.force_path_style,
            aws_access_key_id=dg.EnvVar("S3_ACCESS_KEY_ID"),
            aws_secret_access_key=dg.EnvVar("S3_SECRET_ACCESS_KEY"),
            public_base_url=cfg.s3.public_base_url,
            incoming_bucket=cfg.s3.incoming_bucket_name,
            incoming_prefix=cfg.s3.incoming_prefix,
        ),
        "settings": PipelineSettings(
            watch_path=str(cfg.monitoring.watch_path),
            staging_directory=str(cfg.processing.staging_directory),
            error_directory=str(cfg.processing.error_directory),
            chunk_size=cfg.processing.chunk_size,
            parquet_compression=cfg.processing.parquet_compression,
            max_retries=cfg.processing.max_retries,
            retry_delay_ms=cfg.processing.retry_delay_ms,
            stability_threshold_ms=cfg.monitoring.stability_threshold_ms,
            ignore_initial=cfg.monitoring.ignore_initial,
            validation_rules_dir=str(cfg.processing.validation_rules_dir),
            validation_as_of=cfg.processing.validation_as_of.isoformat() if cfg.processing.validation_as_of else "",
            stale_upload_age_s=cfg.processing.stale_upload_age.total_seconds(),
            staging_retention_s=cfg.processing.staging_retention.total_seconds(),
            csv_null_strings=list(cfg.processing.csv_null_strings),
        ),
        "images": ImageSettings(
            quality=cfg.images.quality,
            output_format=cfg.images.output_format,
            fetch_timeout_ms=cfg.images.fetch_timeout_ms,
            max_bytes=cfg.images.max_bytes,
            webhook_url=cfg.images.webhook_url,
            allow_private_urls=cfg.images.allow_private_urls,
            max_retries=cfg.processing.max_retries,
            retry_delay_ms=cfg.processing.retry_delay_ms,
        ),
        "duckdb": DuckDBResource(database=str(cfg.processing.reports_db_path)),
        "io_manager": dg.FilesystemIOManager(),
    }
