"""The `s3proc` command and the code location, run as a user runs them (subprocesses)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s3proc_dagster.cli.dev import record_ui_url, record_ui_url_in_dotenv, write_dev_env
from s3proc_dagster.cli.processes import GRPC_PORT_OFFSET, free_port
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


def test_the_code_server_loads_the_definitions_without_pyarrow_which_the_run_zygote_preloads() -> None:
    """The code server only evaluates sensors: pyarrow (58 MB) is for runs, which the
    zygote forks with it already imported (runs/zygote.py PRELOAD)."""
    probe = (
        "import sys; import s3proc_dagster.definitions as d; d.defs(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow'))"
    )
    result = run([sys.executable, "-c", probe], {"PATH": os.environ["PATH"]}, ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    from s3proc_dagster.runs.zygote import PRELOAD

    assert {"pyarrow.parquet", "pyarrow.compute", "s3proc_dagster.pipeline"} <= set(PRELOAD)


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


def failed_and_parked(store: SQLiteProgressStore, watch: Path, errors: Path, rel: str, **fields: object) -> FileStatus:
    """A FAILED record whose original the pipeline moved to the error directory, note beside it."""
    (errors / rel).parent.mkdir(parents=True, exist_ok=True)
    (errors / rel).write_text("a,b\n1\n")
    (errors / f"{rel}.error.json").write_text("{}")
    status = record_file(store, watch, rel, checksum="1", **fields)
    store.start(status.file_id)
    return store.fail(status.file_id, "ragged CSV")


def test_status_of_a_failed_file_names_where_it_is_parked_and_shows_no_output(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    watch, errors = Path(pipeline_env["WATCH_PATH"]), Path(pipeline_env["ERROR_DIRECTORY"])
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    broken = failed_and_parked(store, watch, errors, "bad/broken.csv", output_key="p/bad/broken.csv")
    kept = record_file(store, watch, "bad/kept.csv", checksum="2")  # FAILED, but its move failed: still there
    (watch / "bad" / "kept.csv").parent.mkdir(parents=True, exist_ok=True)
    (watch / "bad" / "kept.csv").write_text("a\n")
    store.start(kept.file_id)
    store.fail(kept.file_id, "ragged CSV; the original could not be moved to ERROR_DIRECTORY")
    ok = record_file(store, watch, "ok.csv", checksum="3")
    store.start(ok.file_id)
    store.complete(ok.file_id, "p/ok.csv")
    store.close()

    text = s3proc("status", env=pipeline_env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    (broken_line,) = [line for line in text.stdout.splitlines() if "broken.csv" in line]
    assert f"{errors}/bad/broken.csv" in broken_line and "->" not in broken_line
    assert "p/bad/broken.csv" not in broken_line
    (kept_line,) = [line for line in text.stdout.splitlines() if "kept.csv" in line]
    assert f"{watch}/bad/kept.csv" in kept_line and str(errors) not in kept_line and "->" not in kept_line
    (ok_line,) = [line for line in text.stdout.splitlines() if "ok.csv" in line]
    assert "->  p/ok.csv" in ok_line

    docs = {d["fileId"]: d for d in json.loads(s3proc("status", "--json", env=pipeline_env, cwd=tmp_path).stdout)}
    assert docs[broken.file_id]["parkedPath"] == f"{errors}/bad/broken.csv"
    assert docs[broken.file_id]["filePath"] == f"{watch}/bad/broken.csv"  # the stored fields keep their meaning
    assert docs[broken.file_id]["outputKey"] == "p/bad/broken.csv"
    assert docs[kept.file_id]["parkedPath"] is None and docs[ok.file_id]["parkedPath"] is None
    one = s3proc("status", "bad/broken.csv", env=pipeline_env, cwd=tmp_path).stdout  # and how to find its runs
    assert f"filter by the tag s3proc/file/bad/broken.csv={broken.file_id}" in one


def test_status_of_a_file_without_a_dagster_instance_says_so_in_one_line(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    record_file(store, Path(pipeline_env["WATCH_PATH"]), "nyc/flights.csv", checksum="1")
    store.close()
    env = {**pipeline_env, "DAGSTER_HOME": str(tmp_path / "no-instance")}

    text = s3proc("status", "nyc/flights.csv", env=env, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    (line,) = [line for line in text.stdout.splitlines() if "runs" in line]
    assert f"no Dagster instance at {tmp_path / 'no-instance'}" in line
    as_json = s3proc("status", "nyc/flights.csv", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[0]["runs"] is None
    assert len(as_json.stderr.splitlines()) == 1 and "no Dagster instance" in as_json.stderr
    assert not (tmp_path / "no-instance").exists() and not (tmp_path / ".dagster_home").exists()  # none was made


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
    rows = [line.split(None, 6) for line in lines[2:5]]  # then the file's runs
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


def test_retry_of_an_archive_entry_or_an_s3_object_gives_one_advice_with_or_without_force(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    watch = Path(pipeline_env["WATCH_PATH"])
    (watch / "archives").mkdir()
    (watch / "archives" / "two_csvs.zip").write_bytes(b"PK")
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    for rel in ("archives/two_csvs.zip", "archives/two_csvs.zip!/planes.csv"):
        status = record_file(store, watch, rel, checksum=rel)
        store.start(status.file_id)
        store.complete(status.file_id, f"p/{rel}")
    obj, _ = store.record_detected(
        FileStatus(file_id=make_file_id("in/o.csv"), file_path="s3://b/in/o.csv", file_name="o.csv", checksum="o")
    )
    store.start(obj.file_id)
    store.complete(obj.file_id, "p/in/o.csv")
    store.close()

    for force in ([], ["--force"]):
        entry = s3proc("retry", *force, "archives/two_csvs.zip!/planes.csv", env=pipeline_env, cwd=tmp_path)
        assert entry.returncode == 1
        assert f"retry the archive, {watch}/archives/two_csvs.zip" in entry.stderr, entry.stderr
        assert "--force" not in entry.stderr and "COMPLETED" not in entry.stderr
        from_s3 = s3proc("retry", *force, "s3://b/in/o.csv", env=pipeline_env, cwd=tmp_path)
        assert from_s3.returncode == 1
        # COMPLETED: `process` alone would skip the same version, so the advice is `process --force`
        assert "run `s3proc process --force s3://b/in/o.csv`" in from_s3.stderr, from_s3.stderr
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    assert {f.status.name for f in store.list_files()} == {"COMPLETED"}  # nothing was reset
    store.close()
    parked = Path(pipeline_env["ERROR_DIRECTORY"]) / "archives" / "two_csvs.zip"
    parked.parent.mkdir(parents=True)
    (watch / "archives" / "two_csvs.zip").rename(parked)  # as a failed archive waits
    entry = s3proc("retry", "archives/two_csvs.zip!/planes.csv", env=pipeline_env, cwd=tmp_path)
    assert f"retry the archive, {parked}" in entry.stderr, entry.stderr  # where it is now


# ---- backfill -----------------------------------------------------------------------------------


def test_backfill_status_failed_dry_run_lists_parked_files_and_changes_nothing(
    pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    watch, errors = Path(pipeline_env["WATCH_PATH"]), Path(pipeline_env["ERROR_DIRECTORY"])
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    parked = failed_and_parked(store, watch, errors, "nyc/bad.csv")
    gone = record_file(store, watch, "nyc/gone.csv", checksum="2")  # FAILED, and nowhere any more
    store.start(gone.file_id)
    store.fail(gone.file_id, "ragged CSV")
    entry = record_file(store, watch, "nyc/bundle.zip!/a.csv", checksum="3")  # runs with its archive
    store.start(entry.file_id)
    store.fail(entry.file_id, "ragged CSV")
    obj, _ = store.record_detected(
        FileStatus(file_id=make_file_id("in/o.csv"), file_path="s3://b/in/o.csv", file_name="o.csv", checksum="o")
    )
    store.start(obj.file_id)
    store.fail(obj.file_id, "ragged CSV")
    elsewhere = tmp_path / "my files" / "x.csv"  # `s3proc process` read it outside WATCH_PATH
    outside = record_file(store, elsewhere.parent, "x.csv", checksum="5")
    store.start(outside.file_id)
    store.fail(outside.file_id, "ragged CSV")
    done = record_file(store, watch, "nyc/done.csv", checksum="4")
    (watch / "nyc").mkdir()
    (watch / "nyc" / "done.csv").write_text("a\n1\n")
    store.start(done.file_id)
    store.complete(done.file_id, "p/nyc/done.csv")
    store.close()
    nobody = f"http://127.0.0.1:{free_port()}"  # a dry run asks no webserver

    listed = s3proc("backfill", "--status", "failed", "--dry-run", "--url", nobody, env=pipeline_env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines == [  # by relative path: in/o.csv, nyc/bad.csv
        "would queue  s3://b/in/o.csv  (FAILED: PENDING first, as `s3proc retry`)",
        f"would queue  {errors}/nyc/bad.csv  (FAILED: back to {watch}/nyc/bad.csv and PENDING first, as `s3proc retry`)",
        "2 file(s) selected",
    ], listed.stdout
    assert listed.stderr.splitlines() == [  # the FAILED records it cannot queue, each with why, by path
        f"left out  {watch}/nyc/bundle.zip!/a.csv  (an archive entry: it runs with its archive, {watch}/nyc/bundle.zip)",
        f"left out  {watch}/nyc/gone.csv  (gone: neither where it was read nor in the error directory)",
        f"left out  {elsewhere}  (not under {watch}: `s3proc process '{elsewhere}'` runs it)",
    ], listed.stderr
    only_nyc = s3proc("backfill", "--status", "failed", "--glob", "nyc/**", "--dry-run", env=pipeline_env, cwd=tmp_path)
    assert only_nyc.returncode == 0 and only_nyc.stdout.splitlines()[-1] == "1 file(s) selected", only_nyc.stdout
    completed = s3proc("backfill", "--status", "completed", "--dry-run", env=pipeline_env, cwd=tmp_path)
    assert completed.stdout.splitlines() == [f"would queue  {watch}/nyc/done.csv", "1 file(s) selected"]

    assert (errors / "nyc" / "bad.csv").exists() and not (watch / "nyc" / "bad.csv").exists()
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    assert store.require(parked.file_id).status.name == "FAILED" and store.require(obj.file_id).status.name == "FAILED"
    store.close()


@pytest.mark.parametrize("named_by", ["dotenv", "dagster_home", "url_option"])
def test_backfill_against_a_ui_that_does_not_answer_fails_in_one_line_naming_the_url(
    named_by: str, pipeline_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL comes from where `s3proc dev` records it (the `.env` it wrote, DAGSTER_HOME) or
    from --url; each is tried before anything is changed, and named when nothing answers."""
    monkeypatch.delenv("S3PROC_UI_URL", raising=False)
    home = tmp_path / "dagster_home"
    home.mkdir()
    watch, errors = Path(pipeline_env["WATCH_PATH"]), Path(pipeline_env["ERROR_DIRECTORY"])
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    parked = failed_and_parked(store, watch, errors, "nyc/bad.csv")
    store.close()
    down = f"http://127.0.0.1:{free_port()}"
    options: list[str] = []
    if named_by == "dotenv":
        write_dev_env(tmp_path / ".env")
        assert record_ui_url_in_dotenv(tmp_path / ".env", down)
    elif named_by == "dagster_home":
        record_ui_url(home, down)
    else:
        options = ["--url", down]

    result = s3proc(
        "backfill", "--status", "failed", *options, env={**pipeline_env, "DAGSTER_HOME": str(home)}, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"s3proc: no Dagster UI answers at {down} (") and "--url" in line, line
    assert {"dotenv": str(tmp_path / ".env"), "dagster_home": str(home), "url_option": "--url"}[named_by] in line
    assert (errors / "nyc" / "bad.csv").exists()  # nothing was changed before the UI answered
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    assert store.require(parked.file_id).status.name == "FAILED"
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


@pytest.mark.servers  # Dagster's CLI (dg) in subprocesses, with no setting in their environment, 10-20 s
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


def test_a_free_port_is_never_one_promised_to_a_server_that_has_not_bound_it() -> None:
    # s3proc dev picks the code server's port before the webserver binds the UI port: the
    # kernel would hand the UI port out again (CI saw the webserver fail on "address in use")
    promised = {free_port() for _ in range(50)}
    picked = {free_port(avoid=promised) for _ in range(200)}
    assert not picked & promised
    pairs = {free_port(with_grpc=True, avoid=promised) for _ in range(50)}
    assert not (pairs | {port + GRPC_PORT_OFFSET for port in pairs}) & promised
