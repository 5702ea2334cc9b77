"""Every validation rule of the specification's Configuration, each failing with the variable's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3proc_dagster.errors import SettingsError
from s3proc_dagster.settings import load_configuration

SECRET = "super-secret-value-123"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def valid_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for line in (ROOT / ".env.example").read_text().splitlines():  # start from a clean slate
        if "=" in line and not line.startswith("#"):
            monkeypatch.delenv(line.split("=", 1)[0], raising=False)
    monkeypatch.delenv("NODE_ENV", raising=False)
    (tmp_path / "watch").mkdir()
    for key, value in {
        "S3_ACCESS_KEY_ID": "key-id",
        "S3_SECRET_ACCESS_KEY": SECRET,
        "WATCH_PATH": str(tmp_path / "watch"),
        "ERROR_DIRECTORY": str(tmp_path / "errors"),
        "STAGING_DIRECTORY": str(tmp_path / "staging"),
        "PROGRESS_DB_PATH": str(tmp_path / "progress.db"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_the_seeds(valid_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROGRESS_DB_PATH")
    cfg = load_configuration(env_file=None)
    assert cfg.monitoring.stability_threshold_ms == 2000
    assert cfg.monitoring.poll_interval_ms == 100
    assert cfg.monitoring.ignore_initial is False
    assert (cfg.processing.max_concurrency, cfg.processing.max_retries, cfg.processing.retry_delay_ms) == (4, 3, 1000)
    assert cfg.processing.parquet_compression == "ZSTD"
    assert cfg.processing.chunk_size == 50000
    assert cfg.processing.progress_db_path == valid_env / "progress.db"
    assert cfg.logging.level == "info"
    assert cfg.s3.prefix == "" and cfg.s3.force_path_style is True
    # named, not made: reading the settings creates nothing (the step that parks a file does)
    assert cfg.processing.error_directory == valid_env / "errors" and not (valid_env / "errors").exists()


@pytest.mark.parametrize(
    ("value", "parsed"), [(None, ("",)), ("", ("",)), ("NA,", ("NA", "")), ("NA, NULL ,NA", ("NA", "NULL"))]
)
def test_csv_null_strings_is_a_comma_separated_list_defaulting_to_duckdbs_empty_field(
    valid_env: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, parsed: tuple[str, ...]
) -> None:
    if value is not None:
        monkeypatch.setenv("CSV_NULL_STRINGS", value)
    assert load_configuration(env_file=None).processing.csv_null_strings == parsed


def test_env_file_is_read_and_environment_wins(valid_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (valid_env / ".env").write_text("CHUNK_SIZE=123\nMAX_RETRIES=7\n")
    monkeypatch.setenv("MAX_RETRIES", "5")
    cfg = load_configuration()
    assert cfg.processing.chunk_size == 123 and cfg.processing.max_retries == 5


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("S3_ACCESS_KEY_ID", "", "must be non-empty"),
        ("S3_SECRET_ACCESS_KEY", " ", "must be non-empty"),
        ("S3_BUCKET", "", "must be non-empty"),
        ("S3_ENDPOINT", "localhost:9000", "must start with http"),
        ("WATCH_PATH", "/definitely/not/here", "must be an existing directory"),
        ("ERROR_DIRECTORY", "/proc/forbidden/errors", "cannot be created"),
        ("MAX_CONCURRENCY", "0", "greater than 0"),
        ("MAX_RETRIES", "-1", "greater than or equal to 0"),
        ("PARQUET_COMPRESSION", "LZMA", "'ZSTD' or 'SNAPPY'"),
        ("CHUNK_SIZE", "0", "greater than 0"),
        ("STABILITY_THRESHOLD_MS", "soon", "valid integer"),
        ("IGNORE_INITIAL", "maybe", "valid boolean"),
        ("LOG_LEVEL", "verbose", "'debug', 'info', 'warn' or 'error'"),
        ("S3_PREFIX", "a/../b", "must not contain '..'"),
    ],
)
def test_each_invalid_setting_names_its_variable(
    valid_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_configuration(env_file=None)
    text = str(info.value)
    assert f"{variable}=" in text and message in text


def test_all_problems_reported_at_once_and_secrets_masked(valid_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "")
    monkeypatch.setenv("MAX_CONCURRENCY", "-2")
    monkeypatch.setenv("MONGODB_URI", f"mongodb://user:{SECRET}@host/db")
    monkeypatch.setenv("CHUNK_SIZE", "x")
    with pytest.raises(SettingsError) as info:
        load_configuration(env_file=None)
    text = str(info.value)
    assert "S3_SECRET_ACCESS_KEY=***" in text and "MAX_CONCURRENCY=" in text and "CHUNK_SIZE=" in text
    assert SECRET not in text


def test_secret_values_never_appear_in_repr(valid_env: Path) -> None:
    cfg = load_configuration(env_file=None)
    assert SECRET not in repr(cfg.s3) and SECRET not in str(cfg.s3.model_dump())
    assert cfg.s3.secret_access_key.get_secret_value() == SECRET


def test_a_deployment_is_single_unless_shared_which_needs_a_store_every_node_reaches(
    valid_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_configuration(env_file=None).processing.shared is False
    monkeypatch.setenv("DEPLOYMENT", "Shared")
    with pytest.raises(SettingsError) as excinfo:
        load_configuration(env_file=None)
    assert str(excinfo.value) == (
        "Invalid settings:\n  DEPLOYMENT='Shared': shared needs MONGODB_URI: every node must reach the same progress store"
    )
    monkeypatch.setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
    assert load_configuration(env_file=None).processing.shared is True
    monkeypatch.setenv("DEPLOYMENT", "cluster")
    with pytest.raises(SettingsError, match="DEPLOYMENT='cluster': Input should be 'single' or 'shared'"):
        load_configuration(env_file=None)


def test_an_incoming_prefix_inside_the_output_prefix_is_reserved_and_a_destination_inside_its_source_refused(
    valid_env: Path,
) -> None:
    def s3(**given: str):
        return load_configuration(env_file=None, overrides=given).s3

    assert "incoming" in s3(S3_PREFIX="", S3_INCOMING_PREFIX="incoming/").reserved_folders()  # it would come back in
    assert "in/drop" in s3(S3_PREFIX="out", S3_INCOMING_PREFIX="out/in/drop").reserved_folders()
    assert "in" not in s3(S3_PREFIX="", S3_INCOMING_PREFIX="in", S3_INCOMING_BUCKET="other").reserved_folders()
    with pytest.raises(
        SettingsError, match=r"S3_PREFIX=exports \(a landing zone's destination\) is S3_INCOMING_PREFIX"
    ):
        s3(S3_PREFIX="exports", S3_INCOMING_PREFIX="exports")
    assert s3(S3_PREFIX="exports", S3_INCOMING_PREFIX="exports", S3_INCOMING_BUCKET="drop").prefix == "exports"


@pytest.mark.parametrize(("given", "level"), [("warning", "warn"), ("WARN", "warn"), (" Debug ", "debug")])
def test_log_level_takes_pythons_spelling_and_any_case(valid_env: Path, given: str, level: str) -> None:
    assert load_configuration(env_file=None, overrides={"LOG_LEVEL": given}).logging.level == level


def test_metadata_keys_that_sanitize_to_one_tag_key_keep_both_values() -> None:
    from s3proc_dagster.sources.metadata import run_tags

    tags = run_tags({"a b": "one", "a_b": "two", "": "empty", "t": "\x1b]0;title\x07"})
    assert tags["s3proc.meta/a_b"] == "one" and tags["s3proc.meta/a_b_2"] == "two"
    assert tags["s3proc.meta/_"] == "empty" and tags["s3proc.meta/t"] == "\\x1b]0;title\\x07"  # escaped


@pytest.mark.parametrize("variable", ["STALE_UPLOAD_AGE", "STAGING_RETENTION"])
@pytest.mark.parametrize(("value", "seconds"), [("3600", 3600), ("0", 0), (" 90.5 ", 90.5), ("PT1H", 3600)])
def test_durations_are_seconds_or_iso_8601_as_the_environment_gives_them(
    valid_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, seconds: float
) -> None:
    monkeypatch.setenv(variable, value)  # an environment variable is always text: "3600", never 3600
    processing = load_configuration(env_file=None).processing
    assert getattr(processing, variable.lower()).total_seconds() == seconds


def test_a_duration_that_is_neither_seconds_nor_iso_8601_names_its_variable(
    valid_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STALE_UPLOAD_AGE", "an hour")
    with pytest.raises(SettingsError, match="STALE_UPLOAD_AGE='an hour'"):
        load_configuration(env_file=None)
