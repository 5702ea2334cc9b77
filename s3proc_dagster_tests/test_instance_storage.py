"""The Dagster instance the project writes: SQLite on one machine, PostgreSQL in production."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent
from dagster._core.events.log import EventLogEntry

from s3proc_dagster.cli.embedded import PostgresServer
from s3proc_dagster.runs.instance import POSTGRES_URL_ENV, write_instance
from s3proc_dagster.runs.sqlite_storage import KEPT_ENGINES, KeptEngineEventLogStorage
from s3proc_dagster_tests.conftest import InstanceStorage


@dg.op
def say_hello() -> str:
    return "hello"


@dg.job
def hello_job() -> None:
    say_hello()


def test_with_a_postgres_url_the_instance_is_on_postgres_and_its_file_names_only_the_variable(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database_url = postgres.create_database("instance_yaml")
    # trust auth ignores the password, so a URL with one still connects; it must not reach the file
    url = postgres.database_url("instance_yaml", driver="psycopg2")
    monkeypatch.setenv(POSTGRES_URL_ENV, url.replace("postgres@", "postgres:do-not-write-me@"))
    text = write_instance(tmp_path, max_concurrency=2).read_text()
    assert "do-not-write-me" not in text and "127.0.0.1" not in text
    assert yaml.safe_load(text)["storage"] == {"postgres": {"postgres_url": {"env": POSTGRES_URL_ENV}}}
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
        assert [type(s).__name__ for s in storages] == [
            "PostgresRunStorage",
            "PostgresEventLogStorage",
            "PostgresScheduleStorage",
        ]
        result = hello_job.execute_in_process(instance=instance)
    assert result.success
    assert result.run_id in InstanceStorage("postgres", tmp_path, database_url).run_ids()


def test_without_a_postgres_url_the_instance_stays_on_sqlite_in_dagster_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    config = yaml.safe_load(write_instance(tmp_path, max_concurrency=2).read_text())
    assert config["storage"]["custom"]["config"] == {"base_dir": str(tmp_path / "storage")}
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.event_log_storage).__name__ == "KeptEngineEventLogStorage"
        result = hello_job.execute_in_process(instance=instance)
        events = instance.all_logs(result.run_id)
    # Dagster's own SQLite layout: its tools (`dagster run wipe`, `dagster instance migrate`) still apply
    assert result.run_id in InstanceStorage("sqlite", tmp_path).run_ids()
    assert (tmp_path / "storage" / "history" / "runs" / f"{result.run_id}.db").is_file()
    assert {e.dagster_event_type for e in events if e.dagster_event} >= {
        dg.DagsterEventType.RUN_SUCCESS,
        dg.DagsterEventType.STEP_SUCCESS,
    }


@pytest.mark.servers  # initdb and postgres, started by the test itself through embedded.start_postgres
def test_a_postgres_that_cannot_start_fails_with_its_log_and_leaves_no_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from s3proc_dagster.cli import embedded

    made: list[str] = []
    mkdtemp = embedded.tempfile.mkdtemp
    monkeypatch.setattr(embedded.tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    with socket.socket() as taken:  # the port it is given is taken: it exits at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(embedded, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(embedded.ServerStartError, match="could not create any TCP/IP sockets"):
            embedded.start_postgres(tmp_path)
    assert made and not Path(made[0]).exists()


def _step_start(run_id: str) -> EventLogEntry:
    event = DagsterEvent(event_type_value=dg.DagsterEventType.STEP_START.value, job_name="j", step_key="s")
    return EventLogEntry(
        error_info=None, level=20, user_message="", run_id=run_id, timestamp=time.time(), dagster_event=event
    )


def test_the_kept_engine_event_log_still_wakes_a_watcher_in_another_process_and_keeps_few_engines(
    tmp_path: Path,
) -> None:
    # the UI follows a run on SQLite by watching the run's database change; the writer keeps
    # its connection open, so a write changes only the WAL until a checkpoint: the watch sees it
    watcher, writer = KeptEngineEventLogStorage(str(tmp_path)), KeptEngineEventLogStorage(str(tmp_path))
    writer.store_event(_step_start("run-a"))  # the run's database exists, as when the UI opens a run
    seen: list[object] = []
    watcher.watch("run-a", None, lambda event, cursor: seen.append(event))
    try:
        writer.store_event(_step_start("run-a"))
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen, "the watcher never saw the event written by the other storage"
    finally:
        watcher.dispose()
    for index in range(KEPT_ENGINES + 8):
        writer.store_event(_step_start(f"run-{index}"))
    assert len(writer._engines) == KEPT_ENGINES
    assert len(writer.get_logs_for_run("run-3")) == 1  # an evicted engine's database still reads


def test_a_dagster_home_the_product_creates_is_its_users_alone(tmp_path: Path) -> None:
    home = tmp_path / "new" / ".dagster_home"
    write_instance(home, 4)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and stat.S_IMODE(home.parent.stat().st_mode) == 0o700
