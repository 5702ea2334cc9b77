"""Files that arrive in S3: the incoming sensor, S3 sources end to end, metadata, priority."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from benchmarks.support import Deployment, csv_bytes, promo_rows
from s3proc_dagster.cli.processes import start_in_own_group, stop_process_group
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.models import make_file_id
from s3proc_dagster.runs.instance import write_instance
from s3proc_dagster.runs.reconstructable import definitions
from s3proc_dagster.sources.s3_incoming import list_incoming
from s3proc_dagster.transfer.recovery import delete_prefix
from s3proc_dagster_tests.conftest import InstanceStorage
from s3proc_dagster_tests.pipeline_helpers import COMMAND_DIR, execute, launch, read_dataset, source_rows

ROOT = Path(__file__).resolve().parents[1]


def incoming_tick(deployment: Deployment, cursor: str | None) -> tuple[list[dg.RunRequest], str | None]:
    defs = definitions()
    sensor = defs.resolve_sensor_def("s3_incoming_sensor")
    with dg.build_sensor_context(instance=deployment.instance(), cursor=cursor, resources=defs.resources) as context:
        result = sensor.evaluate_tick(context)
    return list(result.run_requests or []), result.cursor


def put(deployment: Deployment, key: str, body: bytes, metadata: dict[str, str] | None = None) -> None:
    deployment.s3.client().put_object(Bucket=deployment.s3.bucket, Key=key, Body=body, Metadata=metadata or {})


def under(requests: list[dg.RunRequest], folder: str) -> list[dg.RunRequest]:
    return [r for r in requests if any(t.startswith(f"s3proc/file/{folder}/") for t in r.tags)]


def test_new_object_once_and_overwritten_object_again(deployment: Deployment) -> None:
    folder = f"once-{uuid.uuid4().hex[:6]}"
    key = f"incoming/{folder}/a.csv"
    put(deployment, key, b"x,y\n1,2\n")
    requests, cursor = incoming_tick(deployment, None)
    mine = under(requests, folder)
    assert [r.tags["s3proc/path"] for r in mine] == [f"{folder}/a.csv"]
    assert mine[0].run_config["ops"]["checksum_calculation"]["config"]["path"] == f"s3://{deployment.s3.bucket}/{key}"
    assert execute(mine[0], deployment).success  # as the daemon would: the request becomes a run
    again, cursor = incoming_tick(deployment, cursor)
    assert under(again, folder) == []
    put(deployment, key, b"x,y\n1,2\n3,4\n")  # overwritten: new ETag
    third, cursor = incoming_tick(deployment, cursor)
    changed = under(third, folder)
    assert len(changed) == 1 and changed[0].run_key != mine[0].run_key


def test_thousand_objects_are_requested_across_ticks_with_a_small_cursor(deployment: Deployment) -> None:
    client = deployment.s3.client()
    prefix = f"bulk-{uuid.uuid4().hex[:6]}"
    keys = [f"{prefix}/in/d{i % 7}/sub{i % 3}/f{i:04d}.csv" for i in range(1000)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=deployment.s3.bucket, Key=k, Body=b"a\n1\n"), keys))
    for k in (
        f"{prefix}/other/x.csv",
        f"{prefix}/in/.hidden.csv",
        f"{prefix}/in/up.csv.part",
        f"{prefix}/in/out/self.parquet",
    ):
        client.put_object(Bucket=deployment.s3.bucket, Key=k, Body=b"a\n1\n")
    seen: list[str] = []
    cursor = None
    ticks = 0
    sizes = []
    while ticks < 20:
        found, cursor = list_incoming(
            client,
            deployment.s3.bucket,
            f"{prefix}/in",
            cursor,
            datetime.now(UTC),
            exclude_prefixes=(f"{prefix}/in/out/",),
            page_size=100,
            max_pages=2,
        )
        seen += [o.key for o in found]
        sizes.append(len(cursor.dumps()))
        ticks += 1
        if not cursor.after:
            break
    assert sorted(seen) == sorted(keys)  # each once; nothing outside the prefix, hidden, partial or our output
    assert ticks == 6 and max(sizes) < 300  # 1,003 keys under the prefix, 200 a tick
    delete_prefix(client, deployment.s3.bucket, f"{prefix}/")  # the bucket is shared with later tests


def test_object_with_metadata_ends_completed_with_source_and_priority(deployment: Deployment, tmp_path: Path) -> None:
    folder = f"meta-{uuid.uuid4().hex[:6]}"
    key = f"incoming/{folder}/march2024/promo_batch_123.csv"
    body = csv_bytes(promo_rows(1_000, seed=21))
    put(deployment, key, body, {"source": "campaign-manager", "campaignId": "spring-promo-2024", "priority": "high"})
    requests, _ = incoming_tick(deployment, None)
    (request,) = under(requests, folder)
    assert request.tags["dagster/priority"] == "10"
    assert request.tags["s3proc.meta/campaignId"] == "spring-promo-2024"
    result = execute(request, deployment)
    assert result.success
    run = deployment.instance().get_run_by_id(result.run_id)
    assert run.tags["dagster/priority"] == "10"

    record = deployment.store().get_by_path(f"s3://{deployment.s3.bucket}/{key}")
    assert record.status is S.COMPLETED
    assert (record.source_bucket, record.source_key) == (deployment.s3.bucket, key)
    assert record.metadata == {"source": "campaign-manager", "campaignId": "spring-promo-2024", "priority": "high"}
    assert record.file_id == make_file_id(f"{folder}/march2024/promo_batch_123.csv")  # same rule as from disk
    local = tmp_path / "src.csv"
    local.write_bytes(body)
    assert read_dataset(
        deployment, f"{deployment.prefix}/{folder}/march2024/promo_batch_123.csv", tmp_path
    ) == source_rows(local, "read_csv")
    head = deployment.s3.client().head_object(Bucket=deployment.s3.bucket, Key=key)
    assert head["ContentLength"] == len(body)  # the source object is untouched


def test_sidecar_metadata_lands_in_the_record_and_a_bad_one_fails_the_file(deployment: Deployment) -> None:
    from benchmarks.support import write_csv
    from s3proc_dagster_tests.pipeline_helpers import run_requests_under, sensor_tick

    good = write_csv(deployment.watch / "sidecar" / "p.csv", promo_rows(5))
    good.with_name("p.csv.meta.json").write_text(json.dumps({"source": "sftp", "priority": "low"}))
    bad = write_csv(deployment.watch / "sidecar" / "q.csv", promo_rows(5))
    bad.with_name("q.csv.meta.json").write_text("{not json")
    requests = {r.tags["s3proc/path"]: r for r in run_requests_under(sensor_tick(deployment), "sidecar")}
    assert set(requests) == {"sidecar/p.csv", "sidecar/q.csv"}  # sidecars are not files of their own
    assert requests["sidecar/p.csv"].tags["dagster/priority"] == "-10"
    assert execute(requests["sidecar/p.csv"], deployment).success
    assert not execute(requests["sidecar/q.csv"], deployment).success
    store = deployment.store()
    assert store.get_by_path(str(good)).metadata == {"source": "sftp", "priority": "low"}
    failed = store.get_by_path(str(bad))
    assert failed.status is S.FAILED and "q.csv.meta.json" in failed.error_details


def test_high_priority_run_starts_first_in_the_queue(deployment: Deployment, instance_storage: InstanceStorage) -> None:
    home = instance_storage.home
    write_instance(home, max_concurrency=1)  # one run at a time, so the queue's order is the start order
    env = {**os.environ, "IGNORE_INITIAL": "true", "S3_INCOMING_PREFIX": ""}
    folder = f"queue-{instance_storage.kind}"
    order = []
    for name, priority in (("low1", "low"), ("low2", "low"), ("urgent", "high")):
        path = deployment.watch / folder / f"{name}.csv"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(csv_bytes(promo_rows(3)))
        config = {
            "ops": {"checksum_calculation": {"config": {"path": str(path), "relative_path": f"{folder}/{name}.csv"}}}
        }
        launch(
            "process_file_job",
            config,
            tags={"dagster/priority": str({"high": 10, "low": -10}[priority]), "s3proc/name": name},
            env=env,
        )
        order.append(name)
    daemon = start_in_own_group(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        cwd=COMMAND_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        deadline = time.monotonic() + 180
        while True:
            records = instance.get_run_records(dg.RunsFilter(job_name="process_file_job"))
            if len(records) == 3 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records):
                break
            assert time.monotonic() < deadline, [r.dagster_run.status for r in records]
            assert daemon.poll() is None, "dagster daemon exited"
            time.sleep(0.5)  # polling interval, bounded by the deadline
    finally:
        stop_process_group(daemon, deadline_s=20, sig=signal.SIGINT)  # the daemon and its code server
    started = sorted(records, key=lambda r: r.start_time)
    assert started[0].dagster_run.tags["s3proc/name"] == "urgent"
    assert order[-1] == "urgent"  # it was queued last, and still started first
    assert {r.dagster_run.run_id for r in records} <= instance_storage.run_ids()
