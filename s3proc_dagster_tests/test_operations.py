"""Operating it as users do: runs the sensor starts, re-execute from failure, `dagster job
launch`, backfills, run tags; each on SQLite and on PostgreSQL storage (`instance_storage`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import psutil
import pytest

from benchmarks.support import Deployment, dataset_keys, promo_rows, wait_for, write_csv
from s3proc_dagster.cli.dev import record_ui_url_in_dotenv, write_dev_env
from s3proc_dagster.cli.processes import start_in_own_group, stop_process_group
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.runs.batching import batch_request
from s3proc_dagster.runs.reconstructable import process_files_job_with_resources
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.conftest import InstanceStorage
from s3proc_dagster_tests.pipeline_helpers import (
    COMMAND_DIR,
    execute,
    launch,
    read_dataset,
    run_requests_under,
    sensor_tick,
    source_rows,
)

ROOT = Path(__file__).resolve().parents[1]
ZYGOTE = "s3proc_dagster.runs.zygote"  # the module the warm run process runs (runs/launcher.py)


def list_keys(deployment: Deployment, prefix: str) -> list[str]:
    client = deployment.s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=deployment.s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_reexecute_from_failure_uploads_only_what_is_missing(
    deployment: Deployment, instance_storage: InstanceStorage, tmp_path: Path
) -> None:
    folder = f"reexec-{instance_storage.kind}"  # the deployment, its files and store, outlive the test
    src = write_csv(deployment.watch / folder / "promo.csv", promo_rows(120_001, seed=11))
    (request,) = run_requests_under(sensor_tick(deployment), folder)
    dataset = f"{deployment.prefix}/{folder}/promo.csv"

    sha = sha256_file(src)
    deployment.proxy.fail_puts_containing = f"/{part_key(dataset, sha, 1)}"
    try:
        failed = execute(request, deployment)
    finally:
        deployment.proxy.fail_puts_containing = None
    assert not failed.success and deployment.proxy.failed_requests > 0
    store = deployment.store()
    record = store.get_by_path(str(src))
    assert record.status is S.FAILED and "streaming" in record.error_details
    chunks = store.list_chunks(record.file_id)
    assert chunks[0].status is S.COMPLETED and chunks[1].status is S.FAILED
    # its landing during the conversion, then the upload step's first try and its retry
    assert chunks[1].error_summary["processing"] == {"s3UploadFailure": 3}
    landed = {c.chunk_index for c in chunks if c.status is S.COMPLETED}  # chunks upload on threads

    puts_before = len(deployment.proxy.put_keys)
    from s3proc_dagster.runs.reconstructable import process_file_job_with_resources
    from s3proc_dagster_tests.pipeline_helpers import chunk_materializations

    instance = deployment.instance()
    again = dg.execute_job(
        dg.reconstructable(process_file_job_with_resources),
        instance=instance,
        reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance),
    )
    assert again.success
    ran = {e.step_key for e in again.get_step_success_events()}
    assert ran == {"streaming", "integrity_verification", "progress_update"}
    new_puts = [k for k in deployment.proxy.put_keys[puts_before:] if "part-" in k]
    assert new_puts and not any(f"part-{i:05d}" in k for k in new_puts for i in landed)  # landed chunks not re-sent
    reported = sorted(index for _, index in chunk_materializations(again))
    assert reported == [0, 1, 2]  # the re-execution shows every chunk, the ones it found in S3 too

    keys = list_keys(deployment, dataset + "/")
    assert keys == dataset_keys(dataset, sha, 3)
    record = store.get_by_path(str(src))
    assert record.status is S.COMPLETED
    stats = record.processing_stats
    assert (stats.completed_chunks, stats.failed_chunks, stats.successful_records) == (3, 0, 120_001)
    moved = deployment.errors / folder / "promo.csv"
    assert read_dataset(deployment, dataset, tmp_path) == source_rows(moved, "read_csv")
    assert {failed.run_id, again.run_id} <= instance_storage.run_ids()


def test_reexecuting_a_successful_run_is_harmless(deployment: Deployment) -> None:
    src = write_csv(deployment.watch / "idem" / "p.csv", promo_rows(100))
    (request,) = run_requests_under(sensor_tick(deployment), "idem")
    first = execute(request, deployment)
    assert first.success
    dataset = f"{deployment.prefix}/idem/p.csv"
    client = deployment.s3.client()
    before = client.get_object(Bucket=deployment.s3.bucket, Key=f"{dataset}/_manifest.json")["Body"].read()
    from s3proc_dagster.runs.reconstructable import process_file_job_with_resources

    instance = deployment.instance()
    again = dg.execute_job(
        dg.reconstructable(process_file_job_with_resources),
        instance=instance,
        reexecution_options=dg.ReexecutionOptions(parent_run_id=first.run_id),
    )
    assert again.success
    after = client.get_object(Bucket=deployment.s3.bucket, Key=f"{dataset}/_manifest.json")["Body"].read()
    assert after == before
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, sha256_file(src), 1)


def test_runs_carry_tags_a_user_filters_by(deployment: Deployment, instance_storage: InstanceStorage) -> None:
    folder = f"tags-{instance_storage.kind}"
    src = write_csv(deployment.watch / folder / "t.csv", promo_rows(3))
    (request,) = run_requests_under(sensor_tick(deployment), folder)
    result = execute(request, deployment)
    run = deployment.instance().get_run_by_id(result.run_id)
    record = deployment.store().get_by_path(str(src))
    assert run.tags["s3proc/path"] == f"{folder}/t.csv"
    assert run.tags["s3proc/file_id"] == record.file_id
    assert run.tags["s3proc/file_type"] == "csv"
    assert run.tags["s3proc/sha256"] == record.checksum[:12]
    assert result.run_id in instance_storage.run_ids()


def test_dagster_job_launch_processes_a_named_file(deployment: Deployment, instance_storage: InstanceStorage) -> None:
    folder = f"launch-{instance_storage.kind}"
    src = write_csv(deployment.watch / folder / "l.csv", promo_rows(20))
    config = {"ops": {"checksum_calculation": {"config": {"path": str(src), "relative_path": f"{folder}/l.csv"}}}}
    # The daemon also ticks the watch sensor (RUNNING by default); IGNORE_INITIAL keeps it
    # from requesting the other tests' files, which the test harness runs itself.
    daemon = start_in_own_group(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        cwd=COMMAND_DIR,
        env={**os.environ, "IGNORE_INITIAL": "true", "S3_INCOMING_PREFIX": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        launch("process_file_job", config)
        store = deployment.store()

        def finished_runs() -> list[dg.RunRecord]:
            """The file's runs once it is COMPLETED and its run has ended: the run worker is
            in the daemon's process group, so stopping the daemon earlier would interrupt it
            between the last op and the run's SUCCESS event."""
            rec = store.get_by_path(str(src))
            if rec is None or rec.status is not S.COMPLETED:
                return []
            runs = deployment.instance().get_run_records(
                dg.RunsFilter(job_name="process_file_job", tags={"s3proc/file_id": rec.file_id})
            )
            return runs if runs and runs[0].dagster_run.is_finished else []

        deadline = time.monotonic() + 120
        while not (runs := finished_runs()):
            assert time.monotonic() < deadline, f"not completed: {store.get_by_path(str(src))}"
            assert daemon.poll() is None, "dagster daemon exited"
            time.sleep(0.5)  # polling interval while waiting on the daemon-run job, bounded by the deadline
    finally:
        stop_process_group(daemon, deadline_s=20, sig=signal.SIGINT)  # the daemon, its code server and run workers
    assert runs[0].dagster_run.status == dg.DagsterRunStatus.SUCCESS
    # The instance the project writes forks runs from a warm process (runs/launcher.py) rather than
    # starting an interpreter per run, and says so in the run's log.
    messages = [e.message for e in deployment.instance().all_logs(runs[0].dagster_run.run_id)]
    assert any("Run forked from the warm run zygote" in m for m in messages), messages
    assert runs[0].dagster_run.run_id in instance_storage.run_ids()


def watch_sensor_cursor(instance: dg.DagsterInstance, sensor: str = "watch_directory_sensor") -> str | None:
    """A watch sensor's cursor as the daemon stored it: set once the sensor has ticked."""
    for state in instance.all_instigator_state():
        if state.instigator_name == sensor and state.instigator_data is not None:
            return state.instigator_data.cursor
    return None


def run_zygotes(dagster_home: str) -> list[int]:
    """The pids of the warm run processes (`runs/zygote.py`) of the instance in `dagster_home`;
    not the run workers they forked, which carry the same command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            mine = ZYGOTE in (proc.info["cmdline"] or []) and proc.environ().get("DAGSTER_HOME") == dagster_home
            if mine and ZYGOTE not in psutil.Process(proc.ppid()).cmdline():
                found.append(proc.pid)
    return found


def finished_file_runs(instance: dg.DagsterInstance, **tags: str) -> list[dg.RunRecord]:
    """process_file_job runs with `tags`, once every one of them has ended."""
    runs = instance.get_run_records(dg.RunsFilter(job_name="process_file_job", tags=tags))
    return runs if runs and all(r.dagster_run.is_finished for r in runs) else []


def test_a_file_dropped_while_dagster_runs_is_started_by_the_watch_sensor(
    deployment: Deployment, instance_storage: InstanceStorage, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("dagster_dev")  # its daemon ticks the sensor and dequeues the runs
    instance = deployment.instance()
    # IGNORE_INITIAL: the first tick takes what is there as seen; only files after it run.
    wait_for(lambda: watch_sensor_cursor(instance), "the watch sensor's first tick", timeout=120)
    # The daemon's warm process is up before any run asks for it (runs/launcher.py).
    wait_for(lambda: run_zygotes(os.environ["DAGSTER_HOME"]), "the daemon's warm run process", timeout=120)
    (zygote,) = run_zygotes(os.environ["DAGSTER_HOME"])
    src = write_csv(deployment.watch / f"sensed-{instance_storage.kind}" / "s.csv", promo_rows(30))
    wait_for(lambda: finished_file_runs(instance, **{"s3proc/source": str(src)}), "the sensor's run", timeout=180)
    (run,) = finished_file_runs(instance, **{"s3proc/source": str(src)})
    assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert run_zygotes(os.environ["DAGSTER_HOME"]) == [zygote]  # the run was forked from it, none started for it
    assert run.dagster_run.tags["dagster/sensor_name"] == "watch_directory_sensor"
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.COMPLETED and record.processing_stats.successful_records == 30
    assert run.dagster_run.run_id in instance_storage.run_ids()


def test_s3proc_backfill_queues_one_run_per_matching_file_and_the_queue_runs_them(
    deployment: Deployment, instance_storage: InstanceStorage, request: pytest.FixtureRequest
) -> None:
    folder = f"backfill-{instance_storage.kind}"
    sources = [write_csv(deployment.watch / folder / f"{name}.csv", promo_rows(10)) for name in ("a", "b")]
    write_csv(deployment.watch / folder / "skipped.tsv", promo_rows(10), delimiter="\t")
    ui = request.getfixturevalue("dagster_dev")  # started after the files: its sensor leaves them to the backfill
    done = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "backfill", "--glob", f"{folder}/*.csv", "--url", ui],
        cwd=COMMAND_DIR,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "2 file(s) queued" in done.stdout, done.stdout + done.stderr

    instance = deployment.instance()

    def backfilled() -> list[dg.RunRecord]:
        runs = finished_file_runs(instance, **{"s3proc/backfill": "true"})
        return runs if len(runs) == 2 else []

    wait_for(backfilled, "the backfill's two runs", timeout=240)
    runs = backfilled()
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert sorted(r.dagster_run.tags["s3proc/source"] for r in runs) == sorted(map(str, sources))
    store = deployment.store()
    assert all(store.get_by_path(str(src)).status is S.COMPLETED for src in sources)
    assert store.get_by_path(str(deployment.watch / folder / "skipped.tsv")) is None
    assert {r.dagster_run.run_id for r in runs} <= instance_storage.run_ids()


def s3proc(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", *args],
        cwd=cwd,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backfill_status_failed_brings_a_parked_file_back_and_its_run_completes(
    deployment: Deployment, instance_storage: InstanceStorage, request: pytest.FixtureRequest
) -> None:
    folder = f"refail-{instance_storage.kind}"
    src = write_csv(deployment.watch / folder / "f.csv", promo_rows(40))
    parked = deployment.errors / folder / "f.csv"
    (first,) = run_requests_under(sensor_tick(deployment), folder)
    deployment.proxy.fail_puts_containing = f"/{deployment.prefix}/{folder}/f.csv/"  # S3 refuses its uploads
    try:
        assert not execute(first, deployment).success
    finally:
        deployment.proxy.fail_puts_containing = None
    store = deployment.store()
    assert store.get_by_path(str(src)).status is S.FAILED
    assert parked.exists() and not src.exists()  # where every failed file goes, and no scan of WATCH_PATH looks

    listed = s3proc("backfill", "--status", "failed", "--glob", f"{folder}/*", "--dry-run")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.stdout.splitlines()[0].startswith(f"would queue  {parked}  (FAILED: back to {src}")
    assert listed.stdout.splitlines()[-1] == "1 file(s) selected"

    ui = request.getfixturevalue("dagster_dev")
    queued_at = datetime.now(UTC)
    done = s3proc("backfill", "--status", "failed", "--glob", f"{folder}/*", "--url", ui)
    assert done.returncode == 0 and "1 file(s) queued" in done.stdout, done.stdout + done.stderr
    assert src.exists() and not parked.exists()  # back where its run reads it, as `s3proc retry` brings it

    instance = deployment.instance()
    tags = {"s3proc/backfill": "true", "s3proc/source": str(src)}
    wait_for(lambda: finished_file_runs(instance, **tags), "the backfill's run", timeout=240)
    (run,) = finished_file_runs(instance, **tags)
    assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    since = [r for r in finished_file_runs(instance, **{"s3proc/source": str(src)}) if r.create_timestamp >= queued_at]
    assert not [
        r for r in since if "s3proc/retry" in r.dagster_run.tags
    ]  # the sensor's requeue left it to the backfill
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in since)
    record = store.get_by_path(str(src))
    assert record.status is S.COMPLETED and record.processing_stats.successful_records == 40
    assert run.dagster_run.run_id in instance_storage.run_ids()
    sensor_tick(deployment)  # it is back with a new change time: seen, so no later tick asks for it


def test_backfill_finds_a_ui_on_another_port_from_the_dotenv_s3proc_dev_wrote(
    deployment: Deployment, instance_storage: InstanceStorage, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    folder = f"dotenv-{instance_storage.kind}"
    src = write_csv(deployment.watch / folder / "d.csv", promo_rows(10))
    assert len(run_requests_under(sensor_tick(deployment), folder)) == 1  # seen: the backfill runs it
    ui = request.getfixturevalue("dagster_dev")  # on a free port, never 3000
    write_dev_env(tmp_path / ".env")  # what `s3proc dev` writes on its first start, then the UI's URL
    assert record_ui_url_in_dotenv(tmp_path / ".env", ui)
    env = {k: v for k, v in os.environ.items() if k != "S3PROC_UI_URL"}

    done = s3proc("backfill", "--glob", f"{folder}/*.csv", cwd=tmp_path, env=env)
    assert done.returncode == 0 and "1 file(s) queued" in done.stdout, done.stdout + done.stderr

    instance = deployment.instance()
    tags = {"s3proc/backfill": "true", "s3proc/source": str(src)}
    wait_for(lambda: finished_file_runs(instance, **tags), "the backfill's run", timeout=240)
    (run,) = finished_file_runs(instance, **tags)
    assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert deployment.store().get_by_path(str(src)).status is S.COMPLETED


def test_status_of_a_file_lists_its_own_run_and_the_batch_run_that_processed_it(
    deployment: Deployment, instance_storage: InstanceStorage, tmp_path: Path
) -> None:
    folder = f"runs-{instance_storage.kind}"
    for i, name in enumerate("ab"):
        write_csv(deployment.watch / folder / f"{name}.csv", promo_rows(5 + i))
    # the sensor's requests (`run_request_for`'s), each file's and the two in one batch run
    requests = sorted(run_requests_under(sensor_tick(deployment), folder), key=lambda r: r.tags["s3proc/path"])
    assert [r.tags["s3proc/path"] for r in requests] == [f"{folder}/a.csv", f"{folder}/b.csv"]
    own = execute(requests[0], deployment)
    assert own.success
    batch = batch_request(requests)
    batched = dg.execute_job(
        dg.reconstructable(process_files_job_with_resources),
        instance=deployment.instance(),
        run_config=batch.run_config,
        tags={**batch.tags, "dagster/run_key": batch.run_key or ""},
    )
    assert batched.success  # a is unchanged since its own run, so the batch processes b only

    text = s3proc("status", f"{folder}/a.csv", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in text.stdout.splitlines()[3:]}
    assert rows == {
        own.run_id[:8]: ["process_file_job", "SUCCESS"],
        batched.run_id[:8]: ["process_files_job", "SUCCESS"],
    }, text.stdout
    (doc,) = json.loads(s3proc("status", f"{folder}/b.csv", "--json", cwd=tmp_path).stdout)
    assert [(r["runId"], r["job"], r["status"]) for r in doc["runs"]] == [
        (batched.run_id, "process_files_job", "SUCCESS")
    ]
    assert doc["runs"][0]["startTime"]


def test_process_skips_an_unchanged_file_saying_how_and_force_processes_it_again(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A file read from outside WATCH_PATH has no sensor and no `retry`: `retry --force`
    sends the user to `process --force`, which runs it again; `process` alone skips it (the
    advice was `s3proc process`, which skipped the very version it was asked to redo)."""
    src = write_csv(tmp_path / "outside" / f"again-{os.getpid()}-{time.time_ns()}.csv", promo_rows(12))
    first = s3proc("process", str(src), cwd=tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("COMPLETED -> "), first.stdout + first.stderr
    store = deployment.store()
    done = store.get_by_path(str(src))

    again = s3proc("process", str(src), cwd=tmp_path)
    assert again.returncode == 0
    assert again.stdout.startswith(f"SKIPPED: unchanged since run {done.run_id[:8]} (COMPLETED); ")
    assert "`s3proc process --force` processes it again" in again.stdout
    advice = s3proc("retry", "--force", str(src), cwd=tmp_path)
    assert advice.returncode == 1 and f"run `s3proc process --force {src}`" in advice.stderr, advice.stderr

    forced = s3proc("process", "--force", str(src), cwd=tmp_path)
    assert forced.returncode == 0 and forced.stdout.startswith("COMPLETED -> "), forced.stdout + forced.stderr
    redone = store.get_by_path(str(src))
    assert redone.status is S.COMPLETED and redone.run_id not in (done.run_id, None)
    assert redone.run_id[:8] in forced.stdout and redone.completed_at > done.completed_at
