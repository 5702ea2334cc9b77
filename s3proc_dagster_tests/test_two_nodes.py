"""Two nodes, one deployment, on this machine: independent run workers that share only what
a cluster's nodes share.

Each node has a DAGSTER_HOME of its own (its dagster.yaml points at the one PostgreSQL
database), a staging area and a working directory of its own, and runs its files in a
process of its own. Both reach the same MongoDB store (nx-27017), the same bucket and
prefix on SeaweedFS (through a pass-through proxy that counts PUTs and can hold one), and
the same watched directory, which stands for a shared volume; DEPLOYMENT=shared keeps step
outputs in S3. A batch split between the nodes lands every file exactly once; then node A
is SIGKILLed mid-upload, its directories wiped, and node B re-executes A's run from
failure: it completes without sending again a chunk already COMPLETED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.s3_proxy import FaultyS3Proxy
from benchmarks.support import Deployment, S3Endpoint, dataset_keys, list_keys, promo_rows, wait_for, write_csv
from s3proc_dagster.cli.embedded import PostgresServer
from s3proc_dagster.cli.leftovers import SESSION_ENV
from s3proc_dagster.cli.processes import start_in_own_group, stop_process_group
from s3proc_dagster.defs.files.ops import UPLOAD_POOL
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ChunkStatus
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.runs.instance import POSTGRES_URL_ENV, write_instance
from s3proc_dagster.runs.liveness import reap_dead_runs
from s3proc_dagster.runs.reconstructable import process_file_job_with_resources
from s3proc_dagster.stores.mongo import MongoProgressStore
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.pipeline_helpers import read_dataset, source_rows

ROOT = Path(__file__).resolve().parents[1]
BIG_ROWS = 120_001  # three chunks at CHUNK_SIZE=50000
NODE_DEADLINE_S = 240  # a node's whole share of the batch, on a busy machine
TAG = "twonodes/path"


def node_main() -> None:
    """A node's run worker, run in a child process with that node's environment:

        python -c '...; node_main()' run RESULTS PATH...      one run per file, in turn
        python -c '...; node_main()' reexecute RESULTS RUN_ID  RUN_ID again, from failure

    Each run appends {path, run_id, success, steps} as a JSON line to RESULTS."""
    command, results, *args = sys.argv[1:]
    job = dg.reconstructable(process_file_job_with_resources)
    with dg.DagsterInstance.get() as instance:
        for arg in args:
            if command == "run":
                result = dg.execute_job(
                    job,
                    instance=instance,
                    run_config={"ops": {"checksum_calculation": {"config": {"path": arg}}}},
                    tags={TAG: arg},
                    raise_on_error=False,
                )
            else:
                result = dg.execute_job(
                    job,
                    instance=instance,
                    reexecution_options=dg.ReexecutionOptions.from_failure(arg, instance),
                    tags={TAG: instance.get_run_by_id(arg).tags[TAG]},
                    raise_on_error=False,
                )
            line = {
                "path": arg,
                "run_id": result.run_id,
                "success": result.success,
                "steps": sorted(e.step_key for e in result.get_step_success_events()),
            }
            with open(results, "a") as out:
                out.write(json.dumps(line) + "\n")


@dataclass
class Node:
    name: str
    root: Path
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return Path(self.env["DAGSTER_HOME"])

    @property
    def staging(self) -> Path:
        return Path(self.env["STAGING_DIRECTORY"])

    def start(self, logs: Path, command: str, *args: str) -> tuple[subprocess.Popen, Path]:
        """The node's worker process, in a process group of its own, working in its own directory."""
        results = logs / f"{self.name}-{command}-{uuid.uuid4().hex[:6]}.jsonl"
        log = (logs / f"{results.stem}.log").open("w")
        code = "from s3proc_dagster_tests.test_two_nodes import node_main; node_main()"
        try:
            proc = start_in_own_group(
                [sys.executable, "-c", code, command, str(results), *args],
                cwd=self.root / "work",
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()  # the child holds its own copy
        return proc, results


def make_node(name: str, root: Path, shared: dict[str, str]) -> Node:
    node_root = root / name
    (node_root / "work").mkdir(parents=True)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "DAGSTER_", "MONGODB_"))}
    env = {
        **keep,
        **shared,
        "PYTHONPATH": str(ROOT),  # this checkout, whatever the venv has installed
        SESSION_ENV: os.environ[SESSION_ENV],  # so a leftover is found and reported
        "DAGSTER_HOME": str(node_root / "dagster_home"),
        "STAGING_DIRECTORY": str(node_root / "staging"),
        "PROGRESS_DB_PATH": str(node_root / "progress.db"),  # unused: the store is MongoDB
        "REPORTS_DB_PATH": str(node_root / "reports.duckdb"),
    }
    saved = os.environ.get(POSTGRES_URL_ENV)
    os.environ[POSTGRES_URL_ENV] = shared[POSTGRES_URL_ENV]
    try:
        write_instance(Path(env["DAGSTER_HOME"]), max_concurrency=2)  # storage: postgres
    finally:
        if saved is None:
            os.environ.pop(POSTGRES_URL_ENV, None)
        else:
            os.environ[POSTGRES_URL_ENV] = saved
    return Node(name, node_root, env)


def finish(proc: subprocess.Popen, results: Path, deadline_s: float = NODE_DEADLINE_S) -> list[dict]:
    """Wait for a worker to end on its own (bounded), and return what it ran."""
    try:
        code = proc.wait(timeout=deadline_s)
    finally:
        stop_process_group(proc, deadline_s=10, sig=signal.SIGINT)  # a no-op once it has ended
    log = results.with_suffix(".log")
    assert code == 0, log.read_text()[-4000:]
    return [json.loads(line) for line in results.read_text().splitlines()]


@dataclass
class Cluster:
    """Two nodes and what they share: the instance's database, the store, the bucket, the volume."""

    a: Node
    b: Node
    s3: S3Endpoint
    proxy: FaultyS3Proxy
    store: MongoProgressStore
    deployment: Deployment  # for the helpers that read S3: its client and bucket
    incoming: Path
    logs: Path
    running: list[subprocess.Popen]

    @property
    def prefix(self) -> str:
        return self.deployment.prefix

    def start(self, node: Node, command: str, *args: str) -> tuple[subprocess.Popen, Path]:
        proc, results = node.start(self.logs, command, *args)
        self.running.append(proc)
        return proc, results

    def instance(self, node: Node) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(node.home))


@pytest.fixture
def cluster(
    postgres: PostgresServer,
    s3: S3Endpoint,
    s3_prefix: str,
    mongodb_uri: str,
    mongodb_database: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cluster]:
    database = f"dagster_{uuid.uuid4().hex[:10]}"
    postgres.create_database(database)
    pg_url = postgres.database_url(database, driver="psycopg2")
    monkeypatch.setenv(POSTGRES_URL_ENV, pg_url)  # for this process's look at the shared instance
    shared_volume = tmp_path / "shared"
    (shared_volume / "incoming").mkdir(parents=True)
    proxy = FaultyS3Proxy(s3.url)
    shared = {
        **s3.env(),
        "S3_ENDPOINT": proxy.url,
        "S3_PREFIX": s3_prefix,
        "WATCH_PATH": str(shared_volume / "incoming"),
        "ERROR_DIRECTORY": str(shared_volume / "errors"),
        "DEPLOYMENT": "shared",
        "MONGODB_URI": mongodb_uri,
        "MONGODB_DATABASE": mongodb_database,
        POSTGRES_URL_ENV: pg_url,
        "CHUNK_SIZE": "50000",
        "STABILITY_THRESHOLD_MS": "0",
        "MAX_RETRIES": "1",
        "RETRY_DELAY_MS": "10",
        "BATCH_FILES": "false",
        "VALIDATION_AS_OF": "2026-01-01",
        "REPORTS_AUTO_REFRESH": "false",
        "LOG_PRETTY": "false",
    }
    a, b = make_node("node-a", tmp_path, shared), make_node("node-b", tmp_path, shared)
    (tmp_path / "logs").mkdir()
    store = MongoProgressStore(mongodb_uri, mongodb_database)
    nodes = Cluster(
        a,
        b,
        s3,
        proxy,
        store,
        Deployment(tmp_path, shared, s3, proxy),
        shared_volume / "incoming",
        tmp_path / "logs",
        [],
    )
    try:
        # The schema, once, before two workers race to create it in an empty database.
        with nodes.instance(a) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert instance.get_runs_count() == 0
            # And the upload pool's row, as a deployment creates it before its first runs:
            # Dagster (1.13) creates it at the first claim, and on PostgreSQL two runs that
            # claim at once race there; the loser's transaction is aborted (it catches the
            # unique violation and goes on in the same transaction) and its run fails.
            assert instance.event_log_storage.initialize_concurrency_limit_to_default(UPLOAD_POOL)
        yield nodes
    finally:
        for proc in nodes.running:
            stop_process_group(proc, deadline_s=10, sig=signal.SIGINT)
        store.close()
        proxy.stop()


def run_batch(cluster: Cluster, tmp: Path) -> None:
    """Seven files, split between the nodes, both at work at once: every file lands once."""
    a, b, store, s3, proxy = cluster.a, cluster.b, cluster.store, cluster.s3, cluster.proxy
    batch = cluster.incoming / "batch"
    files = [write_csv(batch / f"small-{i}.csv", promo_rows(300 + i, seed=200 + i)) for i in range(6)]
    files.insert(3, write_csv(batch / "big.csv", promo_rows(BIG_ROWS, seed=210)))
    expected = {str(f): (sha256_file(f), source_rows(f, "read_csv")) for f in files}
    share = {a.name: [str(f) for f in files[0::2]], b.name: [str(f) for f in files[1::2]]}
    workers = [(node, *cluster.start(node, "run", *share[node.name])) for node in (a, b)]
    ran = {node.name: finish(proc, results) for node, proc, results in workers}

    for node in (a, b):
        assert [r["path"] for r in ran[node.name]] == share[node.name]
        assert all(r["success"] for r in ran[node.name]), ran[node.name]
        assert node.staging.is_dir()  # each node staged its own files
    with cluster.instance(b) as instance:  # one instance: B's lists A's runs as well as its own
        runs = instance.get_runs(dg.RunsFilter(job_name="process_file_job"))
        assert sorted(r.tags[TAG] for r in runs) == sorted(expected)  # one run per file
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        assert {r.run_id for r in runs} == {r["run_id"] for rs in ran.values() for r in rs}

    assert sorted(f.file_path for f in store.list_files()) == sorted(expected)  # each file once
    for path, (sha, rows) in expected.items():
        record = store.get_by_path(path)
        chunks = 3 if path.endswith("big.csv") else 1
        assert (record.status, record.checksum) == (S.COMPLETED, sha), record.error_details
        assert (record.total_chunks, record.processing_stats.completed_chunks) == (chunks, chunks)
        assert record.processing_stats.successful_records == len(rows)
        assert [c.status for c in store.list_chunks(record.file_id)] == [S.COMPLETED] * chunks
        dataset = f"{cluster.prefix}/batch/{Path(path).name}"
        # exactly one object per chunk (and the manifests), each sent once, by one node
        assert list_keys(cluster.deployment, dataset + "/") == dataset_keys(dataset, sha, chunks)
        parts = [f"/{s3.bucket}/{part_key(dataset, sha, i)}" for i in range(chunks)]
        assert [proxy.put_keys.count(p) for p in parts] == [1] * chunks
        assert read_dataset(cluster.deployment, dataset, tmp) == rows


def kill_a_mid_upload(cluster: Cluster, src: Path, dataset: str, sha: str) -> dict[int, ChunkStatus]:
    """Node A runs `src` until a chunk is COMPLETED and the last one is on its way (held by
    the proxy), then is SIGKILLed with its whole process group; the chunks it landed."""
    proxy, store = cluster.proxy, cluster.store
    proxy.stalled.clear()
    proxy.release.clear()
    proxy.stall_method = "PUT"
    proxy.stall_containing = f"/{part_key(dataset, sha, 2)}"
    proc, results = cluster.start(cluster.a, "run", str(src))
    try:

        def under_way() -> bool:
            assert proc.poll() is None, results.with_suffix(".log").read_text()[-4000:]
            record = store.get_by_path(str(src))
            done = record is not None and any(c.status is S.COMPLETED for c in store.list_chunks(record.file_id))
            return done and proxy.stalled.is_set()

        wait_for(under_way, "node A to have a chunk COMPLETED and the last one on its way", timeout=180)
        os.killpg(proc.pid, signal.SIGKILL)  # the node is gone, with everything it started
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proxy.stall_containing = proxy.stall_method = None
        proxy.release.set()
    record = store.get_by_path(str(src))
    assert record.status is S.IN_PROGRESS
    landed = {c.chunk_index: c for c in store.list_chunks(record.file_id) if c.status is S.COMPLETED}
    assert landed and 2 not in landed
    return landed


def test_two_nodes_share_one_deployment_and_one_reexecutes_the_run_the_other_lost(
    cluster: Cluster, tmp_path: Path
) -> None:
    started = time.monotonic()
    run_batch(cluster, tmp_path)
    batch_s = time.monotonic() - started

    # ---- node A is killed mid-upload; node B re-executes its run from failure ----
    s3, proxy, store = cluster.s3, cluster.proxy, cluster.store
    src = write_csv(cluster.incoming / "kill" / "promo.csv", promo_rows(BIG_ROWS, seed=220))
    sha, rows = sha256_file(src), source_rows(src, "read_csv")
    dataset = f"{cluster.prefix}/kill/promo.csv"
    landed = kill_a_mid_upload(cluster, src, dataset, sha)
    client = s3.client()
    before = {i: client.head_object(Bucket=s3.bucket, Key=c.s3_key) for i, c in landed.items()}
    shutil.rmtree(cluster.a.root)  # its home, staging area and working directory: nothing of A is left

    with cluster.instance(cluster.b) as instance:
        (killed,) = instance.get_runs(dg.RunsFilter(tags={TAG: str(src)}))
        assert killed.status is dg.DagsterRunStatus.STARTED  # Dagster alone would show it running for ever
        assert [r.dagster_run.run_id for r in reap_dead_runs(instance, ["process_file_job"])] == [killed.run_id]
        assert instance.get_run_by_id(killed.run_id).status is dg.DagsterRunStatus.FAILURE

    mark = len(proxy.put_keys)
    (again,) = finish(*cluster.start(cluster.b, "reexecute", killed.run_id))

    assert again["success"], again
    assert again["steps"] == ["integrity_verification", "progress_update", "streaming"]
    sent = [k for k in proxy.put_keys[mark:] if "/part-" in k]
    assert sent == [f"/{s3.bucket}/{part_key(dataset, sha, i)}" for i in range(3) if i not in landed]
    after = {i: client.head_object(Bucket=s3.bucket, Key=c.s3_key) for i, c in landed.items()}
    assert {i: (h["ETag"], h["LastModified"]) for i, h in after.items()} == {
        i: (h["ETag"], h["LastModified"]) for i, h in before.items()
    }  # the chunks A landed are still the very objects A sent
    record = store.get_by_path(str(src))
    assert (record.status, record.checksum, record.processing_stats.completed_chunks) == (S.COMPLETED, sha, 3)
    assert record.processing_stats.successful_records == BIG_ROWS
    chunks = store.list_chunks(record.file_id)
    assert [c.status for c in chunks] == [S.COMPLETED] * 3
    assert {i: (chunks[i].s3_key, chunks[i].sha256) for i in landed} == {
        i: (c.s3_key, c.sha256) for i, c in landed.items()
    }
    assert list_keys(cluster.deployment, dataset + "/") == dataset_keys(dataset, sha, 3)
    assert read_dataset(cluster.deployment, dataset, tmp_path) == rows
    # B found none of A's files: it fetched the snapshot again from the shared volume and
    # converted again. It staged them at the paths the step outputs carry, which name A's
    # STAGING_DIRECTORY here: the product assumes every node has the same one (one image,
    # one set of settings; `pipeline.staging_root`), each its own volume, which two nodes
    # on one machine cannot have without mount namespaces.
    with cluster.instance(cluster.b) as instance:
        rerun = instance.get_run_by_id(again["run_id"])
        assert (rerun.status, rerun.parent_run_id) == (dg.DagsterRunStatus.SUCCESS, killed.run_id)
    print(f"two nodes: batch {batch_s:.1f}s, total {time.monotonic() - started:.1f}s")
