"""Small files share runs under a backlog: each keeps its own records, assets and failure."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from s3proc_dagster.defs.files.events import asset_key_for
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.models import make_file_id
from s3proc_dagster.names import PROCESS_FILES_JOB
from s3proc_dagster.runs.batching import BatchLimits, batch_request, group, under_backlog
from s3proc_dagster.runs.requests import run_request_for
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.conftest import Deployment
from s3proc_dagster_tests.pipeline_helpers import (
    dataset_keys,
    process_files_job_with_resources,
    promo_rows,
    read_dataset,
    run_requests_under,
    sensor_tick,
    source_rows,
    write_csv,
)

LIMITS = BatchLimits(max_files=3, max_bytes=1000, file_max_bytes=400)


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
    files = [[f["relative_path"] for f in r.run_config["ops"]["batch_files"]["config"]["files"]] for r in batches]
    assert files == [["f0.bin", "f1.bin"], ["f3.bin", "f4.bin"]]
    assert batches[0].run_key != batches[1].run_key
    assert batches[0].run_key == batch_request(requests[:2]).run_key  # the same files, the same key


def test_a_batch_run_keeps_each_files_records_assets_and_failure(deployment: Deployment, tmp_path: Path) -> None:
    folder = deployment.watch / "batch"
    good = [write_csv(folder / f"ok{i}.csv", promo_rows(5 + i, seed=i)) for i in range(3)]
    flaky = write_csv(folder / "flaky.csv", promo_rows(7, seed=9))
    broken = folder / "broken.zip"
    broken.write_text("hello, I am not a zip")
    flaky_rows, flaky_sha = source_rows(flaky, "read_csv"), sha256_file(flaky)  # a file that fails is parked
    (request,) = run_requests_under(sensor_tick(deployment, BATCH_FILES="true", MAX_CONCURRENCY="1"), "batch")
    assert request.job_name == PROCESS_FILES_JOB and request.tags["s3proc/batch"] == "5"

    instance = deployment.instance()
    flaky_key = f"{deployment.prefix}/batch/flaky.csv"
    deployment.proxy.fail_puts_containing = f"/{part_key(flaky_key, flaky_sha, 0)}"
    try:
        first = dg.execute_job(
            dg.reconstructable(process_files_job_with_resources),
            instance=instance,
            run_config=request.run_config,
            tags={**request.tags, "dagster/run_key": request.run_key or ""},
        )
    finally:
        deployment.proxy.fail_puts_containing = None
    assert not first.success  # two of its files failed; the other three are done

    store = deployment.store()
    for src in good:
        record = store.get_by_path(str(src))
        assert record.status is S.COMPLETED, record
        dataset = f"{deployment.prefix}/batch/{src.name}"
        assert read_dataset(deployment, dataset, tmp_path) == source_rows(src, "read_csv")
    assert store.get_by_path(str(flaky)).status is S.FAILED
    assert "streaming" in store.get_by_path(str(flaky)).error_details
    assert store.get_by_path(str(broken)).status is S.FAILED
    materialized = {e.asset_key for e in first.all_events if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION}
    key = {src: asset_key_for(deployment.prefix, f"batch/{src.name}") for src in [*good, flaky, broken]}
    assert {key[src] for src in good} <= materialized  # each file its own asset, as in a run of its own
    assert key[flaky] not in materialized and key[broken] not in materialized
    failed_steps = {e.step_key for e in first.all_events if e.is_step_failure}
    assert failed_steps and all("flaky" in key or "broken" in key for key in failed_steps)

    again = dg.execute_job(
        dg.reconstructable(process_files_job_with_resources),
        instance=instance,
        reexecution_options=dg.ReexecutionOptions.from_failure(first.run_id, instance),
    )
    started = {e.step_key for e in again.all_events if e.event_type == dg.DagsterEventType.STEP_START}
    assert started and all("flaky" in key or "broken" in key for key in started)  # the others are not redone
    assert store.get_by_path(str(flaky)).status is S.COMPLETED
    assert read_dataset(deployment, flaky_key, tmp_path) == flaky_rows
    client = deployment.s3.client()
    listed = client.list_objects_v2(Bucket=deployment.s3.bucket, Prefix=flaky_key + "/")
    assert sorted(o["Key"] for o in listed["Contents"]) == dataset_keys(flaky_key, flaky_sha, 1)
    assert store.get_by_path(str(broken)).status is S.FAILED


RUNS_BY_TAG = """
query Runs($tags: [ExecutionTag!]) {
  runsOrError(filter: {tags: $tags}) { ... on Runs { results { runId jobName tags { key value } } } }
}
"""


def graphql(ui: str, query: str, variables: dict) -> dict:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(f"{ui}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


def test_a_batched_file_is_found_by_its_file_tag_through_the_uis_run_filter(
    deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    ui = request.getfixturevalue("dagster_dev")
    files = [write_csv(deployment.watch / "batch-found" / f"f{i}.csv", promo_rows(4, seed=i)) for i in range(3)]
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
