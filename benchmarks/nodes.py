"""Benchmark: files/s with 1, 2 and 4 run workers ("nodes") at once, over
the shared stores a multi-node deployment uses.

    .venv/bin/python benchmarks/nodes.py                       # 24 files of 2000 rows, 1,2,4 nodes
    .venv/bin/python benchmarks/nodes.py --files 48 --concurrency 1,2,4,8 --json

Real servers on loopback, started here: PostgreSQL (Dagster's storage, one database per
measurement), nx-27017 (the MongoDB progress store, one database per measurement) and
SeaweedFS (S3, one prefix per measurement). For N nodes, N worker processes are started,
each as test_two_nodes.py's nodes are: a DAGSTER_HOME of its own whose dagster.yaml
points at the shared PostgreSQL database, a staging area and working directory of its
own, DEPLOYMENT=shared (step outputs in S3), the same watched directory (a shared
volume). The files are split evenly between the workers; each runs its share one run
after the other (`dg.execute_job`, the in-process executor, as a run worker does), so N
runs are in flight at once.

How it counts: every worker imports Dagster and builds the definitions first, then says
it is ready and waits; when all are ready they start together. files/s = files / (last
run's end - first run's start); s/run = the mean wall time of one run; the process start
(about 3 s of imports) is left out, as a warm run launcher leaves it out. `load` is
`os.getloadavg()` at the start and end of each measurement: on a shared machine, read
every figure next to it. Every file must end COMPLETED in the store, or the script fails.

Everything started here is stopped with a deadline and a SIGKILL fallback for its process
group; every process carries a session marker, and the script lists, kills and fails on
any still running at its end. The temporary directory goes too, unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s3proc_dagster.cli.embedded import start_nx27017, start_postgres, start_seaweedfs
from s3proc_dagster.cli.leftovers import SESSION_ENV, describe, find_leftovers, kill
from s3proc_dagster.cli.processes import start_in_own_group, stop_process_group
from s3proc_dagster.defs.files.ops import UPLOAD_POOL
from s3proc_dagster.runs.instance import POSTGRES_URL_ENV, write_instance

ACCESS_KEY, SECRET_KEY, BUCKET = "s3proc-bench", "s3proc-bench-secret", "s3proc-bench"
READY_DEADLINE_S = 180  # imports on a busy machine
RUN_DEADLINE_S = 900


def worker(results: str, go: str, paths: list[str]) -> None:
    """One node: warm up, say ready, wait for `go`, run each file, one JSON line per run."""
    import dagster as dg

    from s3proc_dagster.runs.reconstructable import definitions, process_file_job_with_resources

    definitions()
    job = dg.reconstructable(process_file_job_with_resources)
    with dg.DagsterInstance.get() as instance:
        Path(results + ".ready").touch()
        deadline = time.monotonic() + READY_DEADLINE_S
        while not Path(go).exists():
            if time.monotonic() > deadline:
                raise SystemExit("never told to start")
            time.sleep(0.01)  # polling interval, bounded by the deadline
        for path in paths:
            start = time.time()
            result = dg.execute_job(
                job,
                instance=instance,
                run_config={"ops": {"checksum_calculation": {"config": {"path": path}}}},
                raise_on_error=False,
            )
            line = {"path": path, "success": result.success, "start": start, "end": time.time()}
            with open(results, "a") as out:
                out.write(json.dumps(line) + "\n")


def write_files(folder: Path, count: int, rows: int) -> list[Path]:
    import random

    folder.mkdir(parents=True)
    rng = random.Random(15)
    paths = []
    for i in range(count):
        path = folder / f"file-{i:04d}.csv"
        lines = ["userId,promoCode,amount,seq"]
        lines += [
            f"u-{rng.randrange(10**9)},P{rng.randrange(10**6):06d},{rng.uniform(1, 500):.2f},{n}" for n in range(rows)
        ]
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def measure(nodes: int, root: Path, files: int, rows: int, servers: dict, running: list) -> dict:
    import dagster as dg
    from pymongo import MongoClient

    root.mkdir()
    database = f"bench_{uuid.uuid4().hex[:10]}"
    servers["postgres"].create_database(database)
    os.environ[POSTGRES_URL_ENV] = servers["postgres"].database_url(database, driver="psycopg2")
    paths = write_files(root / "shared" / "incoming" / "batch", files, rows)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "DAGSTER_HOME", "MONGODB_"))}
    shared = {
        **keep,
        "PYTHONPATH": str(ROOT),
        "S3_ENDPOINT": servers["s3"].url,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET": BUCKET,
        "S3_REGION": "us-east-1",
        "S3_FORCE_PATH_STYLE": "true",
        "S3_PREFIX": f"bench-{database}",
        "WATCH_PATH": str(root / "shared" / "incoming"),
        "ERROR_DIRECTORY": str(root / "shared" / "errors"),
        "DEPLOYMENT": "shared",
        "MONGODB_URI": servers["mongodb"].url,
        "MONGODB_DATABASE": database,
        "STABILITY_THRESHOLD_MS": "0",
        "BATCH_FILES": "false",
        "REPORTS_AUTO_REFRESH": "false",
        "LOG_PRETTY": "false",
        "LOG_LEVEL": "warn",
    }
    go = root / "go"
    workers = []
    for i in range(nodes):
        node = root / f"node-{i}"
        (node / "work").mkdir(parents=True)
        env = {
            **shared,
            "DAGSTER_HOME": str(node / "dagster_home"),
            "STAGING_DIRECTORY": str(node / "staging"),
            "PROGRESS_DB_PATH": str(node / "progress.db"),
            "REPORTS_DB_PATH": str(node / "reports.duckdb"),
        }
        write_instance(node / "dagster_home", max_concurrency=nodes)
        if i == 0:  # the schema, once, before the workers race to create it
            with dg.DagsterInstance.from_config(str(node / "dagster_home")) as instance:
                instance.get_runs_count()
                # and the upload pool's row: created by the first claim, two runs claiming at
                # once on PostgreSQL race there and one fails (Dagster 1.13; test_two_nodes.py)
                instance.event_log_storage.initialize_concurrency_limit_to_default(UPLOAD_POOL)
        results = root / f"node-{i}.jsonl"
        with (root / f"node-{i}.log").open("w") as log:
            command = [sys.executable, __file__, "--worker", str(results), str(go), *map(str, paths[i::nodes])]
            proc = start_in_own_group(command, cwd=node / "work", env=env, stdout=log, stderr=subprocess.STDOUT)
        running.append(proc)
        workers.append((proc, results))

    deadline = time.monotonic() + READY_DEADLINE_S
    while not all(Path(f"{results}.ready").exists() for _, results in workers):
        failed = [p for p, _ in workers if p.poll() is not None]
        if failed or time.monotonic() > deadline:
            raise SystemExit(f"a worker did not get ready; see {root}/node-*.log")
        time.sleep(0.05)  # polling interval, bounded by the deadline
    load_start = os.getloadavg()[0]
    go.touch()
    for proc, _ in workers:
        code = proc.wait(timeout=RUN_DEADLINE_S)
        if code != 0:
            raise SystemExit(f"a worker failed ({code}); see {root}/node-*.log")
    load_end = os.getloadavg()[0]
    runs = [json.loads(line) for _, results in workers for line in results.read_text().splitlines()]
    client = MongoClient(servers["mongodb"].url)
    try:
        records = list(client[database]["FileStatus"].find({}, {"filePath": 1, "status": 1, "errorDetails": 1}))
    finally:
        client.close()
    completed = sum(r["status"] == "COMPLETED" for r in records)
    if len(runs) != files or not all(r["success"] for r in runs) or completed != files:
        failed = [r["path"] for r in runs if not r["success"]]
        other = [(r["filePath"], r["status"], r.get("errorDetails")) for r in records if r["status"] != "COMPLETED"]
        raise SystemExit(
            f"{nodes} nodes: {len(runs)} runs, {completed} COMPLETED of {files}; failed runs {failed}; "
            f"records not COMPLETED {other}; see {root}"
        )
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {
        "nodes": nodes,
        "files": files,
        "rows_per_file": rows,
        "wall_s": round(wall, 2),
        "files_per_s": round(files / wall, 3),
        "s_per_run": round(sum(r["end"] - r["start"] for r in runs) / len(runs), 2),
        "load": [round(load_start, 2), round(load_end, 2)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--rows", type=int, default=2000, help="rows per CSV file (one chunk each)")
    parser.add_argument("--concurrency", default="1,2,4", help="numbers of nodes to measure, in turn")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    marker = os.environ.setdefault(SESSION_ENV, f"bench-nodes-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp = Path(tempfile.mkdtemp(prefix="s3proc-nodes-"))
    servers: dict = {}
    running: list[subprocess.Popen] = []
    figures = []
    try:
        servers["s3"] = start_seaweedfs(tmp / "seaweedfs", ACCESS_KEY, SECRET_KEY, BUCKET)
        servers["mongodb"] = start_nx27017(tmp / "nx27017")
        servers["postgres"] = start_postgres(tmp / "postgres")
        for nodes in (int(n) for n in args.concurrency.split(",")):
            figures.append(measure(nodes, tmp / f"nodes-{nodes}", args.files, args.rows, servers, running))
            if not args.json:
                f = figures[-1]
                print(
                    f"{f['nodes']} node(s): {f['files']} files in {f['wall_s']} s = {f['files_per_s']} files/s, "
                    f"{f['s_per_run']} s per run, load {f['load'][0]} -> {f['load'][1]}",
                    flush=True,
                )
    finally:
        for proc in running:
            stop_process_group(proc, deadline_s=10, sig=signal.SIGINT)
        for server in servers.values():
            server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "figures": figures}, indent=2))
    leftovers = find_leftovers(marker)
    for proc in leftovers:
        print(f"left running: {describe(proc)}", file=sys.stderr)
    kill(leftovers)
    return 1 if leftovers else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(main())
