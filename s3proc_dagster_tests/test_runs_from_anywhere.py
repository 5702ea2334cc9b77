"""Runs a user starts outside the sensors behave like the sensors' runs: same tags,
re-executable from the UI, and the same settings whichever command starts them; on
SQLite and on PostgreSQL storage (`instance_storage`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.support import (
    Deployment,
    S3Endpoint,
    dataset_keys,
    list_keys,
    product_env,
    promo_rows,
    wait_for,
    write_csv,
)
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.conftest import ROOT, InstanceStorage
from s3proc_dagster_tests.pipeline_helpers import graphql, launch, run_requests_under, sensor_tick, start_process

FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
REEXECUTE = """
mutation Reexecute($params: ReexecutionParams!) {
  launchPipelineReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
  }
}
"""


def reexecute_from_failure(ui: str, run_id: str) -> str:
    """What the UI's "Re-execute from failure" button sends; the new run's id."""
    params = {"parentRunId": run_id, "strategy": "FROM_FAILURE"}
    answer = graphql(ui, REEXECUTE, {"params": params})["launchPipelineReexecution"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    return answer["run"]["runId"]


def finished(deployment: Deployment, run_id: str) -> dg.DagsterRun:
    instance = deployment.instance()
    wait_for(lambda: instance.get_run_by_id(run_id).status in FINISHED, f"run {run_id} to finish", timeout=240)
    return instance.get_run_by_id(run_id)


def steps_that_ran(deployment: Deployment, run_id: str) -> set[str]:
    events = deployment.instance().all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
    return {e.step_key for e in events}


def latest_run(deployment: Deployment, **tags: str) -> dg.DagsterRun:
    (record,) = deployment.instance().get_run_records(dg.RunsFilter(job_name="process_file_job", tags=tags), limit=1)
    return record.dagster_run


def fail_second_chunk(deployment: Deployment, folder: str) -> tuple[Path, str, dict[str, str]]:
    """A 3-chunk file whose second chunk S3 refuses; the tags the watch sensor gives its run."""
    src = write_csv(deployment.watch / folder / "promo.csv", promo_rows(120_001, seed=71))
    (request,) = run_requests_under(sensor_tick(deployment), folder)
    dataset = f"{deployment.prefix}/{folder}/promo.csv"
    deployment.proxy.fail_puts_containing = f"/{part_key(dataset, sha256_file(src), 1)}"
    tags = {k: v for k, v in request.tags.items() if k != "dagster/sensor_name"}  # Dagster's, names the sensor
    return src, dataset, tags


def check_reexecution(
    deployment: Deployment, ui: str, failed: dg.DagsterRun, src_sha: str, dataset: str, storage: InstanceStorage
) -> None:
    puts_before = len(deployment.proxy.put_keys)
    landed = [k for k in deployment.proxy.put_keys if f"/{dataset}/" in k and "/part-" in k]
    again = finished(deployment, reexecute_from_failure(ui, failed.run_id))
    assert again.status == dg.DagsterRunStatus.SUCCESS
    assert steps_that_ran(deployment, again.run_id) == {"streaming", "integrity_verification", "progress_update"}
    resent = [k for k in deployment.proxy.put_keys[puts_before:] if "/part-" in k and k in landed]
    assert resent == [k for k in resent if k.endswith("part-00001.parquet")]  # only the chunk that had failed
    assert list_keys(deployment, dataset + "/") == dataset_keys(dataset, src_sha, 3)  # one object per chunk
    assert {failed.run_id, again.run_id} <= storage.run_ids()


def test_a_run_started_by_s3proc_process_is_reexecuted_from_failure_in_the_ui(
    deployment: Deployment, instance_storage: InstanceStorage, request: pytest.FixtureRequest
) -> None:
    src, dataset, sensor_tags = fail_second_chunk(deployment, f"ui-reexec-cli-{instance_storage.kind}")
    sha = sha256_file(src)
    try:
        proc = start_process(str(src))
        out, err = proc.communicate(timeout=300)
    finally:
        deployment.proxy.fail_puts_containing = None
    assert proc.returncode == 1 and "FAILED" in out, out + err  # run now, wait, say how it ended
    failed = latest_run(deployment, **{"s3proc/source": str(src)})
    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert failed.remote_job_origin is not None  # what the UI needs to re-execute it
    assert sensor_tags.items() <= failed.tags.items()  # the tags of the sensor's run, all of them
    check_reexecution(deployment, request.getfixturevalue("dagster_dev"), failed, sha, dataset, instance_storage)
    assert deployment.store().get_by_path(str(src)).status is S.COMPLETED


def test_a_run_started_by_dagster_job_launch_is_reexecuted_from_failure_in_the_ui(
    deployment: Deployment, instance_storage: InstanceStorage, request: pytest.FixtureRequest
) -> None:
    src, dataset, sensor_tags = fail_second_chunk(deployment, f"ui-reexec-launch-{instance_storage.kind}")
    ui = request.getfixturevalue("dagster_dev")  # started after the file exists: its sensor leaves it to us
    sha = sha256_file(src)
    config = {"ops": {"checksum_calculation": {"config": {"path": str(src)}}}}
    try:
        launch("process_file_job", config)
        wait_for(
            lambda: deployment.instance().get_run_records(
                dg.RunsFilter(job_name="process_file_job", tags={"s3proc/source": str(src)})
            ),
            "the launched run to tag itself",
        )
        failed = finished(deployment, latest_run(deployment, **{"s3proc/source": str(src)}).run_id)
    finally:
        deployment.proxy.fail_puts_containing = None
    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert sensor_tags.items() <= failed.tags.items()  # tagged by its first step like a sensor's run
    check_reexecution(deployment, ui, failed, sha, dataset, instance_storage)


def test_s3proc_process_reads_its_settings_from_dotenv_alone(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    env = product_env(tmp_path, s3, s3_prefix)
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    data = write_csv(tmp_path / "incoming" / "dotenv.csv", promo_rows(10))
    clean = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "S3PROC_TEST_SESSION": os.environ.get("S3PROC_TEST_SESSION", ""),
    }
    done = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "process", str(data)],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert s3.env()["S3_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
    status = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "status", "--json"],
        cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    (record,) = json.loads(status.stdout)
    assert record["status"] == "completed" and record["outputKey"] == f"{s3_prefix}/dotenv.csv"
