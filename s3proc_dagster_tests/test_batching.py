"""Small files share runs under a backlog: each keeps its own records, assets and failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from benchmarks.support import Deployment, dataset_keys, list_keys, promo_rows, wait_for, write_csv
from s3proc_dagster.defs.files.events import asset_key_for
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.models import make_file_id
from s3proc_dagster.names import PROCESS_FILES_JOB
from s3proc_dagster.runs.batching import BatchLimits, batch_request, group, source_of, under_backlog
from s3proc_dagster.runs.reconstructable import process_files_job_with_resources
from s3proc_dagster.runs.requests import run_request_for
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.pipeline_helpers import (
    execute,
    graphql,
    read_dataset,
    run_requests_under,
    sensor_tick,
    source_rows,
)
from s3proc_dagster_tests.test_runs_from_anywhere import finished, reexecute_from_failure

LIMITS = BatchLimits(max_files=3, max_bytes=1000, file_max_bytes=400)
# The regression guards on Dagster's bookkeeping, as docs/performance.md states them
# (benchmarks/throughput.py measures them): event rows per file of a batch of 30, and of a run of one file.
BATCH_ROWS_PER_FILE = 4
SINGLE_RUN_ROWS = 48


def requests_for(tmp_path: Path, sizes: list[int]) -> list[dg.RunRequest]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(b"x" * size)
        out.append(run_request_for(str(path), path.name, f"f{i}.bin:{size}"))
    return out


def test_files_are_spread_over_every_run_slot_within_the_count_and_byte_limits() -> None:
    assert group([10] * 7, slots=2, limits=LIMITS) == [[0, 1], [2, 3], [4, 5], [6]]  # 3 a run at most, full waves
    assert group([10] * 12, slots=2, limits=LIMITS) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert group([10] * 4, slots=4, limits=LIMITS) == [[0], [1], [2], [3]]  # every slot gets work
    assert group([400, 400, 300, 10], slots=1, limits=LIMITS) == [[0, 1], [2, 3]]  # 1000 bytes a run at most


def test_without_a_backlog_every_file_keeps_a_run_of_its_own(tmp_path: Path) -> None:
    requests = requests_for(tmp_path, [10, 10, 10])
    size = {r.run_key: int(r.run_key.rsplit(":", 1)[1]) for r in requests}
    assert under_backlog(requests, lambda r: size[r.run_key], slots=4, waiting=0, limits=LIMITS) == requests
    assert under_backlog(requests, lambda r: size[r.run_key], slots=4, waiting=1, limits=LIMITS) == requests


def test_under_a_backlog_small_files_share_runs_and_big_or_tagged_files_do_not(tmp_path: Path) -> None:
    requests = requests_for(tmp_path, [10, 10, 500, 10, 10])  # f2 is big
    (tmp_path / "tagged.csv").write_text("a\n1\n")
    tagged = run_request_for(str(tmp_path / "tagged.csv"), "tagged.csv", "t", metadata={"priority": "high"})
    size = {r.run_key: int(r.run_key.rsplit(":", 1)[1]) for r in requests} | {"t": 4}
    planned = under_backlog([*requests, tagged], lambda r: size[r.run_key], slots=2, waiting=3, limits=LIMITS)
    own = [r for r in planned if r.job_name != PROCESS_FILES_JOB]
    assert [r.run_key for r in own] == ["f2.bin:500", "t"]
    batches = [r for r in planned if r.job_name == PROCESS_FILES_JOB]
    files = [
        [f["relative_path"] for f in r.run_config["ops"]["checksum_calculation"]["config"]["files"]] for r in batches
    ]
    assert files == [["f0.bin", "f1.bin"], ["f3.bin", "f4.bin"]]
    assert batches[0].run_key != batches[1].run_key
    assert batches[0].run_key == batch_request(requests[:2]).run_key  # the same files, the same key


def test_a_product_csv_among_a_backlog_keeps_its_own_run_and_the_others_are_batched(tmp_path: Path) -> None:
    requests = requests_for(tmp_path, [10, 10, 10])
    product = tmp_path / "products.csv"
    product.write_text('S. No.,Product Name,Input Image Urls\n1,a,"http://127.0.0.1/a.png"\n')
    images = run_request_for(str(product), "products.csv", "p")
    assert images.job_name != PROCESS_FILES_JOB and "checksum_calculation" not in images.run_config["ops"]
    # the sensor's own measure of a request reads the file's path from its config (an image request has none)
    planned = under_backlog(
        [images, *requests], lambda r: os.path.getsize(source_of(r)["path"]), slots=1, waiting=5, limits=LIMITS
    )
    assert images in planned  # its own run, as before
    assert [r.job_name for r in planned if r is not images] == [PROCESS_FILES_JOB]


def batch_run(deployment: Deployment, request: dg.RunRequest) -> dg.ExecuteJobResult:
    return dg.execute_job(
        dg.reconstructable(process_files_job_with_resources),
        instance=deployment.instance(),
        run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
    )


def part_puts(deployment: Deployment, mark: int, dataset: str) -> list[str]:
    return [k for k in deployment.proxy.put_keys[mark:] if f"/{dataset}/" in k and "/part-" in k]


def status_runs(deployment: Deployment, path: str) -> list[dict]:
    """The runs `s3proc status PATH --json` lists for the file, as a user runs it."""
    shown = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "status", path, "--json"],
        env={**os.environ, **deployment.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)[0]["runs"]


def test_a_batch_fails_each_file_alone_retries_what_a_retry_cures_and_lets_a_stuck_file_leave(
    deployment: Deployment, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = deployment.watch / "batch-alone"
    good = [write_csv(folder / f"ok{i}.csv", promo_rows(5 + i, seed=i)) for i in range(3)]
    flaky, stuck = (
        write_csv(folder / "flaky.csv", promo_rows(7, seed=9)),
        write_csv(folder / "stuck.csv", promo_rows(6)),
    )
    broken = folder / "broken.zip"
    broken.write_text("hello, I am not a zip")
    (batch,) = run_requests_under(sensor_tick(deployment, BATCH_FILES="true", MAX_CONCURRENCY="1"), "batch-alone")
    mine = [t for t in batch.tags if t.startswith("s3proc/file/batch-alone/")]  # and any other file still waiting
    assert batch.job_name == PROCESS_FILES_JOB and len(mine) == 6

    dataset = {src: f"{deployment.prefix}/batch-alone/{src.name}" for src in [*good, flaky, stuck]}
    sha = {src: sha256_file(src) for src in dataset}
    proxy, mark = deployment.proxy, len(deployment.proxy.put_keys)
    # flaky: its part is refused once (an answer boto3 does not retry: the step does), then taken
    proxy.fail_puts_first = {f"/{part_key(dataset[flaky], sha[flaky], 0)}": 1}
    proxy.fail_puts_containing = f"/{part_key(dataset[stuck], sha[stuck], 0)}"  # stuck: refused until disarmed
    try:
        result = batch_run(deployment, batch)
        assert result.success  # the batch completes for the rest

        store = deployment.store()
        for src in [*good, flaky]:
            assert store.get_by_path(str(src)).status is S.COMPLETED
            assert list_keys(deployment, dataset[src] + "/") == dataset_keys(dataset[src], sha[src], 1)
            assert read_dataset(deployment, dataset[src], tmp_path) == source_rows(src, "read_csv")
        assert [len(set(part_puts(deployment, mark, dataset[src]))) for src in good] == [1, 1, 1]
        (retried,) = store.list_chunks(store.get_by_path(str(flaky)).file_id)
        assert retried.error_summary["processing"] == {"s3UploadFailure": 1}  # its step's retry sent it
        gone = store.get_by_path(str(broken))
        assert gone.status is S.FAILED and "not a zip archive" in gone.error_details
        assert deployment.instance().get_run_by_id(result.run_id).tags["s3proc/has_failures"] == "true"
        # the batch succeeded for the others; `status FILE` says it gave this one up
        (batched,) = [r for r in status_runs(deployment, "batch-alone/broken.zip") if r["runId"] == result.run_id]
        assert batched["status"] == "SUCCESS" and batched["gaveUpThisFile"] is True
        assert (deployment.errors / "batch-alone" / "broken.zip").read_text() == "hello, I am not a zip"
        (seen,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        observation = seen.event_specific_data.asset_observation
        assert observation.asset_key == asset_key_for(deployment.prefix, "batch-alone/broken.zip")
        assert observation.metadata["status"].value == "FAILED"
        left = store.get_by_path(str(stuck))
        assert left.status is S.PENDING and f"left batch run {result.run_id[:8]}" in left.error_details

        # the stuck file's run of its own: the sensor of a running deployment asks for it
        ui = request.getfixturevalue("dagster_dev")
        instance = deployment.instance()

        def own_runs() -> list[dg.RunRecord]:
            found = instance.get_run_records(
                dg.RunsFilter(job_name="process_file_job", tags={"s3proc/source": str(stuck)})
            )
            return [r for r in found if r.dagster_run.is_finished]

        wait_for(own_runs, "the stuck file's own run", timeout=240)
        (own,) = own_runs()
        assert own.dagster_run.status == dg.DagsterRunStatus.FAILURE  # S3 still refuses it
        assert store.get_by_path(str(stuck)).status is S.FAILED
    finally:
        proxy.fail_puts_containing, proxy.fail_puts_first = None, {}
    again = finished(deployment, reexecute_from_failure(ui, own.dagster_run.run_id))  # as the UI's button
    assert again.status == dg.DagsterRunStatus.SUCCESS
    assert store.get_by_path(str(stuck)).status is S.COMPLETED
    assert list_keys(deployment, dataset[stuck] + "/") == dataset_keys(dataset[stuck], sha[stuck], 1)


def event_rows(deployment: Deployment, run_id: str) -> int:
    return len(deployment.instance().all_logs(run_id))


def test_event_rows_per_batched_file_and_per_single_run_stay_within_the_documented_figures(
    deployment: Deployment,
) -> None:
    files = [write_csv(deployment.watch / "batch-rows" / f"r{i}.csv", promo_rows(10, seed=i)) for i in range(30)]
    (batch,) = run_requests_under(sensor_tick(deployment, BATCH_FILES="true", MAX_CONCURRENCY="1"), "batch-rows")
    result = batch_run(deployment, batch)
    assert result.success
    assert event_rows(deployment, result.run_id) / len(files) <= BATCH_ROWS_PER_FILE  # docs/performance.md
    write_csv(deployment.watch / "single-rows" / "one.csv", promo_rows(10))
    (single,) = run_requests_under(sensor_tick(deployment), "single-rows")
    alone = execute(single, deployment)
    assert alone.success and event_rows(deployment, alone.run_id) <= SINGLE_RUN_ROWS


RUNS_BY_TAG = """
query Runs($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) { ... on Runs { results { runId jobName tags { key value } } } }
}
"""


def test_a_batched_file_is_found_by_its_file_tag_through_the_uis_run_filter(
    deployment: Deployment, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ui = request.getfixturevalue("dagster_dev")
    # outside WATCH_PATH: the running deployment's own sensor must not start runs of them too
    files = [write_csv(tmp_path / "batch-found" / f"f{i}.csv", promo_rows(4, seed=i)) for i in range(3)]
    rels = [f"batch-found/{f.name}" for f in files]
    batch = batch_request([run_request_for(str(f), rel, f"{rel}:k") for f, rel in zip(files, rels, strict=True)])
    run_id = DagsterGraphQLClient("127.0.0.1", port_number=int(ui.rsplit(":", 1)[1])).submit_job_execution(
        batch.job_name, run_config=batch.run_config, tags=batch.tags
    )
    for rel in rels:  # each file leads to the batch run, by its path and its id
        tag = {"key": f"s3proc/file/{rel}", "value": make_file_id(rel)}
        found = graphql(ui, RUNS_BY_TAG, {"tags": [tag]})["runsOrError"]["results"]
        assert [(r["runId"], r["jobName"]) for r in found] == [(run_id, PROCESS_FILES_JOB)]
        assert tag in found[0]["tags"]  # and the run's page lists every file it holds
