"""The `s3proc` command and the code location, run as a user runs them (subprocesses)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from s3proc_dagster.models import FileStatus, make_file_id
from s3proc_dagster.stores.sqlite import SQLiteProgressStore

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=180)


def s3proc(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "s3proc_dagster.cli", *args], env, cwd)


def test_status_json_on_a_new_store_is_an_empty_list_and_creates_it(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    result = s3proc("status", "--json", env=pipeline_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert Path(pipeline_env["PROGRESS_DB_PATH"]).exists()


def test_status_lists_every_file_with_chunks_and_error(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    _ok, _ = store.record_detected(FileStatus(file_id="ok-1", file_path="/w/ok.csv", file_name="ok.csv", checksum="1"))
    store.plan_chunks("ok-1", 10, 5)
    store.start("ok-1")
    for chunk in store.list_chunks("ok-1"):
        store.chunk_started(chunk.chunk_id, "t")
        store.chunk_completed(chunk.chunk_id, s3_key="k", size_bytes=1, sha256="s", duration=0.1)
    store.complete("ok-1", "prefix/ok.csv")
    store.record_detected(FileStatus(file_id="bad-1", file_path="/w/bad.zip", file_name="bad.zip", checksum="2"))
    store.start("bad-1")
    store.fail("bad-1", "bad.zip: named .zip but is not a zip archive")
    store.close()

    text = s3proc("status", env=pipeline_env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "COMPLETED" in text.stdout and "2/2" in text.stdout and "prefix/ok.csv" in text.stdout
    assert "FAILED" in text.stdout and "not a zip archive" in text.stdout

    as_json = json.loads(s3proc("status", "--json", env=pipeline_env, cwd=tmp_path).stdout)
    assert {d["fileId"]: d["status"] for d in as_json} == {"ok-1": "completed", "bad-1": "failed"}
    assert as_json[0]["processingStats"]["completedChunks"] == 2
    chunks = json.loads(s3proc("status", "/w/ok.csv", "--chunks", "--json", env=pipeline_env, cwd=tmp_path).stdout)
    assert [c["chunkIndex"] for c in chunks[0]["chunks"]] == [0, 1]


def test_invalid_settings_stop_the_command_with_the_variable_named(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    result = s3proc("status", env={**pipeline_env, "MAX_CONCURRENCY": "0"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "MAX_CONCURRENCY='0'" in result.stderr
    assert pipeline_env["S3_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout


def test_code_location_loads_with_dagster_definitions_validate(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    result = run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(ROOT / "workspace.yaml")],
        {**pipeline_env, "DAGSTER_HOME": str(tmp_path)},
        ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr
    assert pipeline_env["S3_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


# ---- naming a file ------------------------------------------------------------------------------


def record_file(store: SQLiteProgressStore, watch: Path, rel: str, **fields: object) -> FileStatus:
    """A record as the pipeline writes it: the absolute path it was read from, the fileId of `rel`."""
    status, _ = store.record_detected(
        FileStatus(file_id=make_file_id(rel), file_path=f"{watch}/{rel}", file_name=rel.rsplit("/", 1)[-1], **fields)
    )
    return status


def test_status_finds_a_file_by_any_path_a_user_sees_and_by_file_id(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    watch = Path(pipeline_env["WATCH_PATH"])
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    flights = record_file(store, watch, "nyc/flights.csv", checksum="1")
    record_file(store, watch, "nyc/other.csv", checksum="2")
    entry = record_file(store, watch, "bundle.zip!/a/b.csv", checksum="3")
    store.close()
    (watch / "nyc").mkdir()

    def file_ids(arg: str, cwd: Path) -> list[str]:
        result = s3proc("status", arg, "--json", env=pipeline_env, cwd=cwd)
        assert result.returncode == 0, f"{arg}: {result.stderr}"
        return [d["fileId"] for d in json.loads(result.stdout)]

    assert file_ids(str(watch / "nyc" / "flights.csv"), tmp_path) == [flights.file_id]  # absolute
    assert file_ids("incoming/nyc/flights.csv", tmp_path) == [flights.file_id]  # relative to here
    assert file_ids("flights.csv", watch / "nyc") == [flights.file_id]  # relative to here, inside the watch
    assert file_ids("nyc/flights.csv", tmp_path) == [flights.file_id]  # relative to WATCH_PATH, as in run tags
    assert file_ids(flights.file_id, tmp_path) == [flights.file_id]
    assert file_ids("bundle.zip!/a/b.csv", tmp_path) == [entry.file_id]
    assert file_ids(f"{watch}/bundle.zip!/a/b.csv", tmp_path) == [entry.file_id]

    text = s3proc("status", "nyc/flights.csv", env=pipeline_env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"{watch}/nyc/flights.csv" in text.stdout and "other.csv" not in text.stdout


def test_status_of_a_path_no_record_has_says_no_file_matches_and_exits_1(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    empty = s3proc("status", env=pipeline_env, cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout.strip() == "no files recorded yet"
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    record_file(store, Path(pipeline_env["WATCH_PATH"]), "nyc/flights.csv", checksum="1")
    store.close()

    text = s3proc("status", "nyc/flights.tsv", env=pipeline_env, cwd=tmp_path)
    assert text.returncode == 1
    assert "no file matches nyc/flights.tsv" in text.stderr
    assert "no files recorded yet" not in text.stdout + text.stderr
    as_json = s3proc("status", "nyc/flights.tsv", "--json", env=pipeline_env, cwd=tmp_path)
    assert as_json.returncode == 1 and json.loads(as_json.stdout) == []


def test_status_chunks_without_json_prints_a_table_row_per_chunk(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    status = record_file(store, Path(pipeline_env["WATCH_PATH"]), "nyc/flights.csv", checksum="1")
    store.plan_chunks(status.file_id, 25, 10)  # records 0-9, 10-19, 20-24
    store.start(status.file_id)
    first, second, _ = store.list_chunks(status.file_id)
    store.chunk_started(first.chunk_id, "t")
    store.chunk_completed(
        first.chunk_id, s3_key="p/nyc/flights.csv/part-00000.parquet", size_bytes=4321, sha256="s", duration=0.1
    )
    store.chunk_started(second.chunk_id, "t")
    store.chunk_failed(second.chunk_id, "SlowDown: please reduce your request rate")
    store.close()

    result = s3proc("status", "nyc/flights.csv", "--chunks", env=pipeline_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "nyc/flights.csv" in lines[0]
    header = lines[1].split()
    assert header[:6] == ["index", "status", "records", "offsets", "bytes", "retries"] and "key" in header
    rows = [line.split(None, 6) for line in lines[2:]]
    assert [r[:4] for r in rows] == [
        ["0", "COMPLETED", "10", "0-9"],
        ["1", "FAILED", "10", "10-19"],
        ["2", "PENDING", "5", "20-24"],
    ]
    assert rows[0][4] == "4321" and "p/nyc/flights.csv/part-00000.parquet" in lines[2]
    assert "SlowDown: please reduce your request rate" in lines[3]


def test_status_json_into_a_reader_that_stops_early_exits_quietly(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    watch = Path(pipeline_env["WATCH_PATH"])
    for i in range(150):
        record_file(store, watch, f"batch/file-{i:03}.csv", checksum=str(i), metadata={"note": "x" * 2000})
    everything = json.dumps([f.to_document() for f in store.list_files()], indent=2)
    store.close()
    assert len(everything) > 256 * 1024  # far more than a pipe holds, so the writer must meet the closed end

    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "s3proc_dagster.cli", "status", "--json"],
            env={**os.environ, **pipeline_env},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=err,
        )
        assert proc.stdout is not None
        head = proc.stdout.read(10)  # what `| head -c 10` does, then it exits
        proc.stdout.close()
        code = proc.wait(timeout=120)
    assert head.startswith(b"[")
    assert "Traceback" not in stderr.read_text() and "BrokenPipe" not in stderr.read_text()
    assert code == 141  # 128 + SIGPIPE, what a shell reports for `cat` in the same place


# ---- retry --------------------------------------------------------------------------------------


def test_retry_refuses_a_completed_file_and_force_sets_it_pending(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    watch = Path(pipeline_env["WATCH_PATH"])
    (watch / "nyc").mkdir()
    (watch / "nyc" / "flights.csv").write_text("a,b\n1,2\n")
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    status = record_file(store, watch, "nyc/flights.csv", checksum="1")
    store.start(status.file_id)
    store.complete(status.file_id, "p/nyc/flights.csv")

    refused = s3proc("retry", "nyc/flights.csv", env=pipeline_env, cwd=tmp_path)
    assert refused.returncode == 1
    assert "is COMPLETED, not FAILED" in refused.stderr and "--force" in refused.stderr
    assert store.require(status.file_id).status.name == "COMPLETED"

    forced = s3proc("retry", "--force", "nyc/flights.csv", env=pipeline_env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "PENDING" in forced.stdout and "was COMPLETED" in forced.stdout
    assert store.require(status.file_id).status.name == "PENDING"
    store.close()


def test_retry_brings_a_failed_file_back_from_the_error_directory(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    watch, errors = Path(pipeline_env["WATCH_PATH"]), Path(pipeline_env["ERROR_DIRECTORY"])
    (errors / "nyc").mkdir(parents=True)
    (errors / "nyc" / "bad.csv").write_text("a,b\n1\n")
    (errors / "nyc" / "bad.csv.error.json").write_text("{}")
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    status = record_file(store, watch, "nyc/bad.csv", checksum="1")
    store.start(status.file_id)
    store.fail(status.file_id, "ragged CSV")

    result = s3proc("retry", "errors/nyc/bad.csv", env=pipeline_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (watch / "nyc" / "bad.csv").read_text() == "a,b\n1\n"
    assert not (errors / "nyc" / "bad.csv").exists() and not (errors / "nyc" / "bad.csv.error.json").exists()
    assert store.require(status.file_id).status.name == "PENDING"
    store.close()


# ---- help ---------------------------------------------------------------------------------------


def test_s3proc_alone_prints_the_full_help_and_exits_2(tmp_path: Path) -> None:
    result = s3proc(env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: s3proc")
    for command in ("status", "read", "process", "backfill", "retry", "images", "dev"):
        assert f"\n    {command} " in result.stderr, command
    assert "the following arguments are required" not in result.stderr


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += every_parser(sub)
    return found


def test_every_help_text_stands_alone_and_describes_every_option() -> None:
    from s3proc_dagster.cli.commands import build_parser

    parsers = every_parser(build_parser())
    assert len(parsers) == 10  # s3proc, status, read, process, backfill, retry, images, submit, status, dev
    for parser in parsers:
        text = parser.format_help()
        assert "README" not in text and "seed" not in text.lower(), parser.prog
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
    dev = next(p for p in parsers if p.prog.endswith(" dev")).format_help()
    assert "S3PROC_UI_HOST" in dev and "S3PROC_UI_PORT" in dev


def _tree(root: Path) -> set[str]:
    """Every path under the checkout but the virtualenv and caches: what a command leaves behind."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"} & set(p.relative_to(root).parts)
    }


def test_dg_checks_and_lists_the_code_location_in_an_empty_environment(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    empty = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}  # no setting, no secret
    before = _tree(ROOT)
    checked = subprocess.run(
        [str(bin_dir / "dg"), "check", "defs"], cwd=ROOT, env=empty, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = subprocess.run(
        [str(bin_dir / "dg"), "list", "defs", "--json"],
        cwd=ROOT,
        env=empty,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    names = listed.stdout
    for name in (
        "process_file_job",
        "reconcile_job",
        "watch_directory_sensor",
        "s3_incoming_sensor",
        "reconcile_schedule",
    ):
        assert name in names
    assert _tree(ROOT) - before == set()  # importing the code location made nothing
