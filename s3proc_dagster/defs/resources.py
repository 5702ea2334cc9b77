"""Resources: the settings, S3 (dagster-aws), the progress store and the reports' DuckDB.

One configuration schema: `settings.py` (pydantic-settings) names, defaults and checks
every variable, and the `settings` resource loads it from the environment (and `.env`)
when a run, a sensor tick or a schedule starts. Importing the code location therefore
makes no directory and contacts no server (`dg check defs` works with an empty
environment), and a bad setting fails the run with every bad variable named. The
S3 credentials alone are fields, given as `dg.EnvVar`, so the UI shows the variables'
names, never their values; no op reads a credential itself.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from s3proc_dagster.defs.loggers import console
from s3proc_dagster.logs import configure_logging
from s3proc_dagster.runs.liveness import Heartbeat
from s3proc_dagster.settings import Configuration, load_configuration, zone_overrides
from s3proc_dagster.stores import open_store
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.client import make_client
from s3proc_dagster.transfer.keys import join_key


class Settings(dg.ConfigurableResource):
    """The product's settings, as `settings.py` defines them, validated when first used."""

    env_file: str = Field(default=".env", description="read after the environment, which wins")
    overrides: dict[str, str] = Field(
        default_factory=dict,
        description="non-secret settings by variable name (CHUNK_SIZE: '10000') that win over the environment",
    )

    _config: Configuration | None = PrivateAttr(default=None)

    @property
    def config(self) -> Configuration:
        """Loaded and validated on first use; the process's `s3proc` logger follows its
        LOG_LEVEL and LOG_PRETTY from then on (`logs.configure_logging`)."""
        if self._config is None:
            self._config = load_configuration(self.env_file, self.overrides)
            configure_logging(self._config.logging)
        return self._config

    @property
    def staging(self) -> Path:
        return self.config.processing.staging_directory

    def for_zone(self, overrides: Mapping[str, str]) -> Settings:
        """These settings as a landing zone's runs see them: its own variables (its source,
        destination, chunking, rules...) over these, its failed files parked in a folder of
        the error directory named after it. No overrides: these settings, the default zone."""
        if not overrides:
            return self
        merged = {**self.overrides, **zone_overrides(overrides, self.config.processing.error_directory)}
        return _zone_settings(self.env_file, tuple(sorted(merged.items())))


@functools.cache
def _zone_settings(env_file: str, overrides: tuple[tuple[str, str], ...]) -> Settings:
    """One settings object per zone and process: a run's steps load the zone's settings once."""
    return Settings(env_file=env_file, overrides=dict(overrides))


class S3Storage(S3Resource):
    """dagster-aws's S3 resource: credentials from `dg.EnvVar`, the rest (endpoint, region,
    bucket, prefix, path-style addressing for SeaweedFS or MinIO) from the settings."""

    settings: Settings

    def get_client(self) -> Any:
        s3 = self.settings.config.s3
        return make_client(
            s3.endpoint,
            s3.region,
            self.aws_access_key_id,
            self.aws_secret_access_key,
            s3.force_path_style,
            self.max_attempts,
            self.aws_session_token,
        )

    @property
    def bucket(self) -> str:
        return self.settings.config.s3.bucket

    @property
    def prefix(self) -> str:
        return self.settings.config.s3.prefix

    def key(self, *parts: str) -> str:
        """A key under the configured prefix."""
        return join_key(self.prefix, *parts)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


class ProgressStoreResource(dg.ConfigurableResource):
    """SQLite at PROGRESS_DB_PATH, or MongoDB when MONGODB_URI is set.

    The store is opened once per run process and closed at teardown; state lives in the
    store, never in the resource, so any number of run processes can share it. Inside a
    run the resource also beats the run's heartbeat: the store's claims are held by runs,
    and a claim is only as good as its run's liveness (`runs.liveness`).
    """

    settings: Settings

    _store: ProgressStore | None = PrivateAttr(default=None)
    _heartbeat: Heartbeat | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.run_id and context.instance is not None:
            self._heartbeat = Heartbeat(context.instance, context.run_id).start()

    def open(self) -> ProgressStore:
        if self._store is None:
            self._store = open_store(self.settings.config.processing)
        return self._store

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._store is not None:
            self._store.close()
            self._store = None


class ReportsDatabase(DuckDBResource):
    """dagster-duckdb's resource on REPORTS_DB_PATH (or `database`, when given).

    Unlike progress.db, the file gets no mode of its own: it holds no credential, only
    copies of the store's records that the reports exist to show in the UI, and DuckDB
    refuses a file created empty and 0600 beforehand (and writes its `.wal` beside it
    with the umask's mode anyway). Materialised in a run worker, it is 0600 all the
    same: run workers run under a 077 umask (runs/zygote.py, runs/launch.py)."""

    database: str = Field(default="", description="empty: REPORTS_DB_PATH")
    settings: Settings

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        path = Path(self.database or self.settings.config.processing.reports_db_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with DuckDBResource(database=str(path), connection_config=self.connection_config).get_connection() as conn:
            yield conn


class StepOutputs(dg.ConfigurableIOManagerFactory):
    """Where a run's steps keep their outputs, as JSON (`step_outputs`): DAGSTER_HOME's
    storage on one machine (`DEPLOYMENT=single`), S3 under S3_STEP_OUTPUTS_PREFIX when a
    re-execution may land on another node (`shared`). Chosen when a run starts, from the
    settings, so that importing the code location reads none. A node that lacks the
    staged files the outputs point to derives them again (`pipeline.staged_snapshot`)."""

    settings: Settings
    s3: S3Storage

    def create_io_manager(self, context: dg.InitResourceContext) -> dg.IOManager:
        from s3proc_dagster.defs.step_outputs import local_outputs, outputs_in_s3

        if not self.settings.config.processing.shared:
            assert context.instance is not None
            return local_outputs(Path(context.instance.storage_directory()))
        return outputs_in_s3(self.s3.get_client(), self.s3.bucket, self.settings.config.s3.step_outputs_prefix)


def resources_for(settings: Settings) -> dict[str, Any]:
    """Every resource, on one settings resource: a deployment's, or one test's."""
    s3 = S3Storage(
        settings=settings,
        aws_access_key_id=dg.EnvVar("S3_ACCESS_KEY_ID"),
        aws_secret_access_key=dg.EnvVar("S3_SECRET_ACCESS_KEY"),
    )
    return {
        "settings": settings,
        "s3": s3,
        "progress_store": ProgressStoreResource(settings=settings),
        "duckdb": ReportsDatabase(settings=settings),
        "io_manager": StepOutputs(settings=settings, s3=s3),
    }


defs = dg.Definitions(
    resources=resources_for(Settings()),
    loggers={"console": console},
    # One process per run: a file's steps are sequential, and the reports share one DuckDB
    # file, which allows a single writing process at a time.
    executor=dg.in_process_executor,
)
