"""The `s3proc` command and the code location, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from s3proc_dagster.models import FileStatus
from s3proc_dagster.stores.sqlite import SQLiteProgressStore

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=180)


def s3proc(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "s3proc_dagster.cli", *args], env, cwd)


def test_status_json_on_a_new_store_is_an_empty_list_and_creates_it(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    result = s3proc("status", "--json", env=pipeline_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert Path(pipeline_env["PROGRESS_DB_PATH"]).exists()


def test_status_lists_every_file_with_chunks_and_error(pipeline_env: dict[str, str], tmp_path: Path) -> None:
    store = SQLiteProgressStore(pipeline_env["PROGRESS_DB_PATH"])
    ok, _ = store.record_detected(FileStatus(file_id="ok-1", file_path="/w/ok.csv", file_name="ok.csv", checksum="1"))
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


def test_invalid_settings_stop_the_command_with_the_variable_named(pipeline_env: dict[str, str], tmp_path: Path) -> None:
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
