"""The specification's Configuration (S3Config, MonitoringConfig, ProcessingConfig, LoggingConfig), plus ImageConfig.

Every value comes from the environment or `.env`, named in upper snake case. All
groups are validated together at load, so a user with three typos sees three lines
in one error instead of fixing them one start-up at a time. Secrets are `SecretStr`
and are printed as `***` everywhere, including in the validation message.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from s3proc_dagster.errors import SettingsError

DEFAULT_RULES_DIR = Path(__file__).resolve().parents[1] / "dbt_like_sql" / "validations"
# DuckDB read_csv's own null strings: only the empty field is NULL (files/tabular.py's
# DUCKDB_NULL_STRINGS; not imported from there, so reading settings does not load DuckDB).
CSV_NULL_STRINGS_DEFAULT: tuple[str, ...] = ("",)
SECRET_FIELDS = {"S3_SECRET_ACCESS_KEY", "S3_ACCESS_KEY_ID", "MONGODB_URI"}
IMAGE_OUTPUT_FOLDER = "images"  # below S3_PREFIX: `images/<request id>/...`
STEP_OUTPUTS_FOLDER = "_s3proc/step-outputs"  # below S3_PREFIX, unless S3_STEP_OUTPUTS_PREFIX says otherwise


def _config(prefix: str = "") -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )


class S3Config(BaseSettings):
    """Where chunks and files go. `endpoint` empty means AWS itself."""

    model_config = _config("S3_")

    endpoint: str = ""
    region: str = "us-east-1"
    bucket: str = "s3proc"
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")
    force_path_style: bool = True
    prefix: str = ""
    public_base_url: str = ""
    incoming_prefix: str = ""
    incoming_bucket: str = ""
    # Where a shared deployment keeps its steps' outputs (JSON records "Re-execute from
    # failure" loads back): a key prefix in S3_BUCKET; empty is S3_PREFIX/_s3proc/step-outputs.
    # Its top folder below S3_PREFIX is reserved: no source's output can land there.
    step_outputs_prefix: str = ""

    @field_validator("access_key_id", "secret_access_key")
    @classmethod
    def _non_empty_secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must be non-empty")
        return value

    @field_validator("bucket", "region")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be non-empty")
        return value.strip()

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("prefix", "incoming_prefix", "step_outputs_prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        cleaned = value.strip().strip("/")
        if ".." in cleaned.split("/"):
            raise ValueError("must not contain '..'")
        return cleaned

    @model_validator(mode="after")
    def _step_outputs_apart_from_producers(self) -> S3Config:
        """The default below S3_PREFIX, and never below the incoming prefix, where producers
        write: step outputs there could be forged."""
        if not self.step_outputs_prefix:
            self.step_outputs_prefix = "/".join(p for p in (self.prefix, STEP_OUTPUTS_FOLDER) if p)
        incoming = self.incoming_prefix
        if not incoming or self.incoming_bucket_name != self.bucket:
            return self
        if self.prefix == incoming or self.prefix.startswith(incoming + "/"):
            raise ValueError(
                f"S3_PREFIX={self.prefix} (a landing zone's destination) is S3_INCOMING_PREFIX={incoming} "
                "(its source) or inside it, in one bucket: every output would come back in as a new file; "
                "give it a destination outside its source"
            )
        value = self.step_outputs_prefix
        if value == incoming or value.startswith(incoming + "/"):
            raise ValueError(
                f"S3_STEP_OUTPUTS_PREFIX={value} must not be below S3_INCOMING_PREFIX={incoming}, where producers write"
            )
        return self

    @property
    def incoming_bucket_name(self) -> str:
        return self.incoming_bucket or self.bucket

    @property
    def incoming_uri(self) -> str:
        """The incoming prefix as an s3:// URI, "" when it is off."""
        return f"s3://{self.incoming_bucket_name}/{self.incoming_prefix}" if self.incoming_prefix else ""

    def reserved_folders(self) -> tuple[str, ...]:
        """Folders below S3_PREFIX where no source may land: image outputs, step outputs when
        S3_STEP_OUTPUTS_PREFIX is inside S3_PREFIX, and the incoming prefix when it is (an
        output landing there would come back in as a new file)."""
        reserved = [IMAGE_OUTPUT_FOLDER]
        inside = self.step_outputs_prefix.removeprefix(self.prefix + "/") if self.prefix else self.step_outputs_prefix
        if inside != self.step_outputs_prefix or not self.prefix:
            reserved.append(inside.split("/", 1)[0])
        incoming = self.incoming_prefix.strip("/")
        if incoming and self.incoming_bucket_name == self.bucket:
            below = incoming.removeprefix(self.prefix + "/") if self.prefix else incoming
            if below != incoming or not self.prefix:
                reserved.append(below)
        return tuple(reserved)


class MonitoringConfig(BaseSettings):
    model_config = _config()

    watch_path: Path = Path("./data/incoming")
    stability_threshold_ms: int = Field(2000, ge=0)
    poll_interval_ms: int = Field(100, ge=0)
    ignore_initial: bool = False

    @field_validator("watch_path")
    @classmethod
    def _readable_dir(cls, value: Path) -> Path:
        path = value.expanduser().resolve()
        if not path.is_dir():
            raise ValueError("must be an existing directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError("must be readable")
        return path


class ProcessingConfig(BaseSettings):
    model_config = _config()

    max_concurrency: int = Field(4, gt=0)
    max_retries: int = Field(3, ge=0)
    retry_delay_ms: int = Field(1000, ge=0)
    error_directory: Path = Path("./data/errors")
    staging_directory: Path = Path("./data/staging")
    progress_db_path: Path = Path("./progress.db")
    parquet_compression: Literal["ZSTD", "SNAPPY"] = "ZSTD"
    chunk_size: int = Field(50000, gt=0)
    # The largest file (or object) processed; bigger ones are FAILED unread. 64 GiB stays
    # under what a multipart upload of 8 MiB parts can hold (10,000 parts, 78 GiB).
    max_file_bytes: int = Field(64 * 2**30, gt=0)
    mongodb_uri: SecretStr = SecretStr("")
    mongodb_database: str = "s3proc"
    reports_db_path: Path = Path("./data/reports.duckdb")
    reports_auto_refresh: bool = True
    validation_rules_dir: Path = DEFAULT_RULES_DIR
    validation_as_of: date | None = None
    # An unfinished multipart upload no live run owns is aborted once it is this old
    # (seconds, or ISO 8601 such as PT1H); younger ones may still be resumed.
    stale_upload_age: timedelta = Field(timedelta(hours=1), ge=timedelta(0))
    # How long a COMPLETED file's staged snapshot and conversion are kept (0: removed when
    # it completes). Files IN_PROGRESS or FAILED keep theirs: a retry starts from them.
    staging_retention: timedelta = Field(timedelta(0), ge=timedelta(0))
    # Under a backlog (more files ready than MAX_CONCURRENCY runs can start), small files
    # share runs: at most BATCH_MAX_FILES files and BATCH_MAX_BYTES bytes per run; a file
    # over BATCH_FILE_MAX_BYTES (or with a sidecar) always gets a run of its own.
    batch_files: bool = True
    batch_max_files: int = Field(50, gt=0)
    batch_max_bytes: int = Field(64 * 2**20, gt=0)
    batch_file_max_bytes: int = Field(8 * 2**20, ge=0)
    # Comma-separated; `NA,` is ("NA", ""): NA and the empty field. Not JSON (NoDecode).
    csv_null_strings: Annotated[tuple[str, ...], NoDecode] = CSV_NULL_STRINGS_DEFAULT
    # `single`: one machine. `shared`: a run, or its re-execution, may land on any node, so
    # the steps' outputs go to S3 (under S3_STEP_OUTPUTS_PREFIX) instead of DAGSTER_HOME, and
    # the progress store must be one every node reaches (MongoDB). See docs/scaling.md.
    deployment: Literal["single", "shared"] = "single"

    @field_validator("parquet_compression", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("error_directory", "staging_directory")
    @classmethod
    def _writable_dir(cls, value: Path) -> Path:
        """Writable, or creatable where it is missing; created by the step that first writes
        there, never by reading the settings (importing the code location makes nothing)."""
        path = value.expanduser().resolve()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            raise ValueError(f"cannot be created ({existing} is not a directory)")
        try:  # a probe, removed at once: access() says yes to root even where nothing can be made
            tempfile.TemporaryDirectory(dir=existing, prefix=".s3proc-probe-").cleanup()
        except OSError as exc:
            raise ValueError(
                "must be writable" if existing == path else f"cannot be created ({exc.strerror})"
            ) from None
        return path

    @field_validator("deployment", mode="before")
    @classmethod
    def _lower_deployment(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("deployment")
    @classmethod
    def _shared_needs_a_shared_store(cls, value: str, info: ValidationInfo) -> str:
        """A SQLite progress store is one machine's file: nodes sharing a deployment would
        each claim, count and complete files in their own copy."""
        uri = info.data.get("mongodb_uri")
        if value == "shared" and not (uri and uri.get_secret_value()):
            raise ValueError("shared needs MONGODB_URI: every node must reach the same progress store")
        return value

    @field_validator("stale_upload_age", "staging_retention", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        """`3600` (seconds, as .env.example writes them) or ISO 8601 (`PT1H`): pydantic reads a
        number given as text, which every environment variable is, as neither."""
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
            return float(value)
        return value

    @field_validator("validation_as_of", mode="before")
    @classmethod
    def _empty_is_today(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("csv_null_strings", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """`NA,` -> ("NA", ""); empty -> ("",), DuckDB's default. Spaces around items are dropped."""
        if isinstance(value, str):
            return tuple(dict.fromkeys(item.strip() for item in value.split(",")))
        return value

    @field_validator("validation_rules_dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return DEFAULT_RULES_DIR if value in ("", None) else value

    @field_validator("progress_db_path", "reports_db_path", "validation_rules_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def uses_mongodb(self) -> bool:
        return bool(self.mongodb_uri.get_secret_value())

    @property
    def shared(self) -> bool:
        """Whether a run may land on any node of the deployment (DEPLOYMENT=shared)."""
        return self.deployment == "shared"


class LoggingConfig(BaseSettings):
    model_config = _config("LOG_")

    level: Literal["debug", "info", "warn", "error"] = "info"
    pretty: bool = Field(default_factory=lambda: os.environ.get("NODE_ENV") != "production")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        """Any case; `warning`, Python's own name for the level, is `warn`."""
        lowered = value.strip().lower() if isinstance(value, str) else value
        return "warn" if lowered == "warning" else lowered


class ImageConfig(BaseSettings):
    """Image requests. Quality 50 is the usual reading of "compress by 50%"."""

    model_config = _config("IMAGE_")

    quality: int = Field(50, ge=1, le=95)
    output_format: Literal["", "JPEG", "PNG", "WEBP"] = ""
    # Each connect and each read of a fetch; a byte arriving re-arms it, so it catches a
    # stalled host, not a slow one.
    fetch_timeout_ms: int = Field(15000, gt=0)
    # The whole fetch of one image: every redirect hop, the headers and the body. 60 s carries
    # IMAGE_MAX_BYTES (25 MiB) at 3.5 Mbit/s, generous for product images (usually well under
    # 1 MiB), and caps how long a host dripping bytes holds a row. Not retried when it passes.
    fetch_deadline_ms: int = Field(60000, gt=0)
    # Where an s3:// image URL may point, comma-separated s3://bucket/prefix; empty: S3_PREFIX
    # of S3_BUCKET and the incoming prefix, never step outputs. The CSV's author is not
    # trusted, and the service can read more than what images are.
    s3_sources: Annotated[tuple[str, ...], NoDecode] = ()
    max_bytes: int = Field(25 * 1024 * 1024, gt=0)
    # The product CSV is read whole and each row becomes a step of the run, so both are capped
    # for a file whoever can drop one controls. 10,000 rows is a large catalogue and already
    # 10,000 steps (each several events in Dagster's event log); 16 MiB holds that many rows
    # with a handful of long URLs each (about 1.6 KB a row). Over either, the request is FAILED.
    csv_max_bytes: int = Field(16 * 2**20, gt=0)
    csv_max_rows: int = Field(10_000, gt=0)
    webhook_url: str = ""
    # The CSV's URLs are user input: off, a URL (or a redirect) reaching a loopback,
    # link-local, private, multicast or reserved address is refused (see images/egress.py).
    allow_private_urls: bool = False

    @field_validator("output_format", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("webhook_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("s3_sources", mode="before")
    @classmethod
    def _s3_prefixes(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        for item in value or ():
            if not str(item).startswith("s3://") or not str(item)[5:].split("/", 1)[0]:
                raise ValueError(f"{item!r} is not an s3://bucket[/prefix]")
        return value


class ZoneConfig(BaseSettings):
    """Which landing zone a run's files belong to, and what the zone adds to the settings
    above (its source, destination, chunking and rules are WATCH_PATH or
    S3_INCOMING_PREFIX, S3_PREFIX, CHUNK_SIZE... given for the zone's runs). Empty NAME
    is the default zone: the settings alone, as without any zone declared."""

    model_config = _config("ZONE_")

    name: str = ""
    include: Annotated[tuple[str, ...], NoDecode] = ("**",)  # comma-separated globs below the source
    exclude: Annotated[tuple[str, ...], NoDecode] = ()
    priority: int = Field(0, ge=-100, le=100)  # the zone's runs' dagster/priority
    # keep | delete | move:<directory or s3://bucket/prefix>, once a version is COMPLETED and committed
    after_success: str = "keep"
    # _source_file, _source_row, _file_sha256 and _landed_at on every Parquet row
    lineage_columns: bool = False
    # a file whose columns differ from the zone's last landing: off, warn, or blocking (FAILED)
    schema_drift: Literal["off", "warn", "blocking"] = "off"

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _globs(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(zone_glob(g.strip()) for g in value.split(",") if g.strip())
        return value

    @field_validator("after_success")
    @classmethod
    def _action(cls, value: str) -> str:
        return after_success_action(value)


def after_success_action(value: str) -> str:
    """`keep`, `delete` or `move:<target>`, checked where a zone is declared (`dg check defs`)
    as well as where its runs load it: a typo otherwise failed every tick of its sensor."""
    action, _, target = value.strip().partition(":")
    if not ((action in ("keep", "delete") and not target) or (action == "move" and target.strip())):
        raise ValueError(f"{value!r} must be keep, delete or move:<directory or s3://bucket/prefix>")
    return value.strip()


def zone_glob(pattern: str) -> str:
    """A zone's include or exclude glob as `files.globs` matches it, against a path below the
    source: one that can never match such a path, or would not mean what it says there, is
    refused rather than leaving the zone silently taking nothing (or everything). A comma
    would split it in ZONE_INCLUDE; braces and [classes] are literal characters there."""
    if not pattern.strip():
        raise ValueError("an empty glob matches no file")
    if pattern.startswith("/") or pattern.startswith("~"):
        raise ValueError(f"{pattern!r}: globs match the path below the source, never an absolute path")
    if ".." in pattern.split("/"):
        raise ValueError(f"{pattern!r}: a path below the source has no '..'")
    if bad := sorted(set(pattern) & set(",{}[]")):
        raise ValueError(
            f"{pattern!r}: {''.join(bad)!r} is not glob syntax here (only *, ** and ?); give one glob per pattern"
        )
    return pattern


class Configuration:
    """All the groups, loaded and validated together."""

    def __init__(
        self,
        s3: S3Config,
        monitoring: MonitoringConfig,
        processing: ProcessingConfig,
        logging: LoggingConfig,
        images: ImageConfig,
        zone: ZoneConfig | None = None,
    ) -> None:
        self.s3 = s3
        self.monitoring = monitoring
        self.processing = processing
        self.logging = logging
        self.images = images
        self.zone = zone or ZoneConfig()


_GROUPS: dict[str, tuple[type[BaseSettings], str]] = {
    "s3": (S3Config, "S3_"),
    "monitoring": (MonitoringConfig, ""),
    "processing": (ProcessingConfig, ""),
    "logging": (LoggingConfig, "LOG_"),
    "images": (ImageConfig, "IMAGE_"),
    "zone": (ZoneConfig, "ZONE_"),
}


def _describe(prefix: str, error: dict) -> str:
    if not error["loc"]:  # a check across fields: its message names them, and the input holds secrets
        return error["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in error["loc"])
    variable = f"{prefix}{field}".upper()
    value = error.get("input")
    shown = "***" if variable in SECRET_FIELDS else repr(value)
    message = error["msg"].removeprefix("Value error, ")
    return f"{variable}={shown}: {message}"


def load_configuration(
    env_file: str | os.PathLike | None = ".env", overrides: Mapping[str, str] | None = None
) -> Configuration:
    """Load every group; raise one SettingsError that lists every bad variable.

    `overrides` maps variable names (`CHUNK_SIZE`) to values that win over the
    environment and `.env`: a deployment's resource config, or one test's settings.
    """
    loaded: dict[str, BaseSettings] = {}
    problems: list[str] = []
    for name, (cls, prefix) in _GROUPS.items():
        fields = {
            key[len(prefix) :].lower(): value
            for key, value in (overrides or {}).items()
            if key.upper().startswith(prefix) and key[len(prefix) :].lower() in cls.model_fields
        }
        try:
            loaded[name] = cls(_env_file=env_file, **fields)  # type: ignore[call-arg]
        except ValidationError as exc:
            problems.extend(_describe(prefix, e) for e in exc.errors())
    if problems:
        raise SettingsError("Invalid settings:\n  " + "\n  ".join(problems))
    return Configuration(**loaded)  # type: ignore[arg-type]


def zone_overrides(zone: Mapping[str, str], error_directory: Path) -> dict[str, str]:
    """A landing zone's settings as its runs load them: its own variables, and its failed
    files parked apart from the other zones' (`ERROR_DIRECTORY/<zone name>`), so a retry
    of one zone's file never picks up another's. Runs and the CLI both use this, so
    `s3proc status` looks for a parked file where the run put it."""
    merged = dict(zone)
    if (name := merged.get("ZONE_NAME")) and "ERROR_DIRECTORY" not in merged:
        merged["ERROR_DIRECTORY"] = str(error_directory / name)
    return merged


def poll_interval_s(environ: dict[str, str] | None = None) -> int:
    """How often the sensors tick, for their definitions: POLL_INTERVAL_MS in whole seconds
    (Dagster ticks a sensor at most once a second). Read leniently, because definitions are
    loaded before any setting is validated: a bad value falls back to the default here and
    is reported, with every other bad variable, when a run or the CLI loads the settings."""
    raw = (os.environ if environ is None else environ).get("POLL_INTERVAL_MS", "")
    try:
        milliseconds = int(raw) if raw.strip() else MonitoringConfig.model_fields["poll_interval_ms"].default
    except ValueError:
        milliseconds = MonitoringConfig.model_fields["poll_interval_ms"].default
    return max(1, -(-max(milliseconds, 0) // 1000))
