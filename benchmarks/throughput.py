"""Benchmark: many small files through the deployment as users run it, against the
same files through the domain functions (the `pipeline` package) in one process, in one invocation.

    .venv/bin/python benchmarks/throughput.py                              # 300 files, warm launcher
    .venv/bin/python benchmarks/throughput.py --files 20 --launcher warm,default
    .venv/bin/python benchmarks/throughput.py --launcher warm,default:60 --json   # 300 warm, 60 default

For each `--launcher` variant: a fresh DAGSTER_HOME whose `dagster.yaml` is the project's
`runs.instance.instance_config` (`warm`: the WarmRunLauncher, as `s3proc dev` writes it;
`default`: `warm_runs=False`, Dagster's launcher, a fresh interpreter per run), a fresh
store and S3 prefix, the settings a user leaves alone (STABILITY_THRESHOLD_MS 2000,
MAX_CONCURRENCY 4, validation and reports refresh on), SeaweedFS on loopback, and what
`scripts/dev` runs (`s3proc dev`: Dagster's code server, webserver and daemon; `default`:
`dagster dev -w workspace.yaml`) from a temporary directory (so no developer `.env`
counts). N files of a few KB (promo CSV, orders JSONL, random .bin, shuffled) are renamed
into the watched directory at once; a file's arrival is its rename, its completion the
store's `completed_at`. The per-run breakdown and the event counts are read from the
instance (the sensor's ticks, run records, each run's event log). Then, with it stopped, the same files (fresh copies, store and prefix) go through the `pipeline` package's steps
in one child process.

How it counts:
  - files/s: N / (last COMPLETED - first arrival); one process: N / its loop's wall time.
  - CPU-s per file: CPU of the deployment's process tree (`s3proc dev` or `dagster dev`,
    webserver, daemon, code server, run zygote, run workers) from the drop until every run has ended, divided by N, split by
    role. Each process's own user + system time is sampled every 0.1 s and the last value
    kept, also for processes that have exited: the run zygote ignores SIGCHLD, so its
    children's times never reach anyone's "children" times. A process loses what it ran
    after its last sample (at most 0.1 CPU-s), so the figures are a slight lower bound.
  - peak RSS: the largest sum of RSS over the tree's live processes (forked workers count
    the zygote's shared pages again); peak PSS: the same with PSS (shared pages divided
    among their sharers), sampled every 0.5 s.
  - load: `os.getloadavg()` at the start and end of each phase: on a shared machine, read
    every figure next to it.

Everything started here is stopped with a deadline and a SIGKILL fallback for its process
group (SIGINT for the deployment, SIGTERM for SeaweedFS), also on Ctrl-C, SIGTERM or an
error; every process carries a session marker, and the script lists, kills and fails on
any still running at its end. The temporary directory goes too, unless `--keep`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil
import yaml

# Light imports only: the one-process baseline re-runs this file, and its peak RSS must be
# the domain's; Dagster is imported where it is needed.
from s3proc_dagster.cli.dev import DAGSTER_STOP_DEADLINE_S, wait_for_ui
from s3proc_dagster.cli.embedded import start_seaweedfs
from s3proc_dagster.cli.leftovers import SESSION_ENV, describe, find_leftovers, kill
from s3proc_dagster.cli.processes import ServerStartError, free_port, start_in_own_group, stop_process_group
from s3proc_dagster.runs.instance import instance_config

ACCESS_KEY, SECRET_KEY, BUCKET = "throughput", "throughput-secret", "throughput"
MAX_CONCURRENCY = 4
LAUNCHERS = ("warm", "default", "batch")  # batch: warm, and small files share runs under the backlog
SAMPLE_S, PSS_EVERY = 0.1, 5  # CPU and RSS every 0.1 s, PSS every 5th sample
IDLE_S = 5.0  # the deployment idles this long before the drop (its idle CPU is reported)
SECONDS_PER_FILE, DEADLINE_BASE_S = 60.0, 180.0  # at load 15 on 2 cores: 0.025-0.09 files/s
WATCH_SENSOR = "watch_directory_sensor"
STEPS = (
    "checksum_calculation",
    "type_detection",
    "archive_extraction",
    "parquet_conversion",
    "streaming",
    "integrity_verification",
    "progress_update",
)
#: Which process of the tree does what, from its command line (first match wins).
ROLES = (
    ("execute_run", "run workers"),
    ("runs.zygote", "run zygote"),
    ("dagster_webserver", "webserver"),
    ("dagster-webserver", "webserver"),
    ("daemon", "daemon"),
    ("api grpc", "code server"),
    ("code-server", "code server"),
    ("dagster dev", "dagster dev"),
    ("s3proc_dagster.cli dev", "s3proc dev"),
    ("resource_tracker", "s3proc dev"),
)


class BenchmarkError(RuntimeError):
    """The product did not do what the benchmark needs (a file FAILED, a deadline passed)."""


def say(message: str) -> None:
    """Progress goes to stderr, so that `--json` leaves stdout to the summary."""
    print(message, file=sys.stderr, flush=True)


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


# ---- the files ------------------------------------------------------------------------------------


def promo_csv(rng: random.Random) -> bytes:
    """The promotions files' shape; `promo_*.csv` is validated by the promotions rule set,
    as users' promo files are. About 1 record in 50 breaks a rule."""
    lines = ["userId,promoCode,offerExpiry,amount,seq"]
    for i in range(rng.randint(40, 120)):
        user = "" if rng.random() < 0.02 else "u-" + rng.randbytes(5).hex()
        day = f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        lines.append(f"{user},{rng.randbytes(4).hex().upper()},{day},{rng.uniform(1, 500):.2f},{i}")
    return ("\n".join(lines) + "\n").encode()


def orders_jsonl(rng: random.Random) -> bytes:
    return b"".join(
        json.dumps({"orderId": rng.randbytes(6).hex(), "items": rng.randint(1, 9), "seq": i}).encode() + b"\n"
        for i in range(rng.randint(30, 90))
    )


WRITERS: dict[str, tuple[str, Callable[[random.Random], bytes]]] = {
    "csv": ("promo_{i:04d}.csv", promo_csv),
    "jsonl": ("orders_{i:04d}.jsonl", orders_jsonl),
    "bin": ("blob_{i:04d}.bin", lambda rng: rng.randbytes(rng.randint(2048, 8192))),
}


def generate(folder: Path, count: int, seed: int) -> list[str]:
    """`count` files in equal shares of each kind, shuffled (so the first n of them are
    mixed too), spread over 10 subfolders; returns their paths relative to `folder`."""
    rng = random.Random(seed)
    kinds = [list(WRITERS)[i % len(WRITERS)] for i in range(count)]
    rng.shuffle(kinds)
    relative = []
    for i, kind in enumerate(kinds):
        name, write = WRITERS[kind]
        rel = f"f{i % 10:02d}/{name.format(i=i)}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(write(rng))
        relative.append(rel)
    return relative


def copy_files(source: Path, target: Path, relative: Sequence[str]) -> None:
    for rel in relative:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target / rel)


def product_environment(root: Path, s3_url: str) -> dict[str, str]:
    """The settings of a user who changed nothing but where things live (.env.example).
    MONGODB_URI is empty: the SQLite store is the one measured."""
    env = {
        "S3_ENDPOINT": s3_url,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET": BUCKET,
        "S3_PREFIX": root.name,
        "WATCH_PATH": str(root / "incoming"),
        "ERROR_DIRECTORY": str(root / "errors"),
        "STAGING_DIRECTORY": str(root / "staging"),
        "PROGRESS_DB_PATH": str(root / "progress.db"),
        "REPORTS_DB_PATH": str(root / "reports.duckdb"),
        "MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "MONGODB_URI": "",
    }
    Path(env["WATCH_PATH"]).mkdir(parents=True, exist_ok=True)
    return env


# ---- the process tree ---------------------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """CPU by role, and peak RSS and PSS, of a process and all its descendants (see the
    module's docstring for the method)."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="tree-sampler", daemon=True)
        self.pid = pid
        self.cpu: dict[tuple[int, float], list] = {}  # (pid, create time) -> [role, CPU-s]
        self.peak = {"rss": 0, "pss": 0, "processes": 0}
        self.pss_by_role_at_peak: dict[str, int] = {}  # what each role held when the tree's PSS peaked
        self._done = threading.Event()

    def run(self) -> None:
        for n in itertools.count():
            if self._done.wait(SAMPLE_S):
                return
            self.sample(pss=n % PSS_EVERY == 0)

    def sample(self, pss: bool) -> None:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss_sum = live = 0
        pss_by_role: Counter = Counter()
        for process in processes:
            with suppress(psutil.Error), process.oneshot():
                key = (process.pid, process.create_time())
                if key not in self.cpu:
                    self.cpu[key] = [role(process), 0.0]
                times = process.cpu_times()
                self.cpu[key][1] = max(self.cpu[key][1], times.user + times.system)
                if process.status() != psutil.STATUS_ZOMBIE:
                    rss += process.memory_info().rss
                    if pss:
                        held = process.memory_full_info().pss
                        pss_sum += held
                        pss_by_role[self.cpu[key][0]] += held  # its role, found at its first sample
                    live += 1
        self.peak["rss"], self.peak["processes"] = max(self.peak["rss"], rss), max(self.peak["processes"], live)
        if pss_sum > self.peak["pss"]:
            self.peak["pss"], self.pss_by_role_at_peak = pss_sum, dict(pss_by_role)

    def by_role(self) -> Counter:
        out: Counter = Counter()
        for name, cpu in list(self.cpu.values()):
            out[name] += cpu
        return out

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(timeout=10)


def role(process: psutil.Process) -> str:
    """The default launcher's run workers are the code server's multiprocessing children;
    the warm launcher's are forked from the zygote, whose command line they keep."""
    command, parent = " ".join(process.cmdline()), process.parent()
    name = next((name for needle, name in ROLES if needle in command), "other")
    if parent and (name == "run zygote" or "multiprocessing.spawn" in command):
        return "run workers" if role(parent) in ("run zygote", "code server") else name
    return name


# ---- one variant: the deployment, the drop, the instance ---------------------------------------------------


@dataclass
class RunTimes:
    """One file's run as the instance recorded it (epoch seconds; None where absent)."""

    run_id: str
    arrival: float
    completed: float  # the store's completed_at
    tick: float | None = None
    created: float | None = None
    dequeued: float | None = None  # RUN_DEQUEUED, else RUN_STARTING (written as the daemon dequeues)
    worker_up: float | None = None  # the worker's "Started process for run"
    started: float | None = None  # RUN_START
    end: float | None = None
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)  # STEP_START, STEP_SUCCESS
    hooks: dict[str, float] = field(default_factory=dict)  # the step's hook event (mark_failed: skipped)
    events: Counter = field(default_factory=Counter)  # event log rows by type


@dataclass
class Variant:
    launcher: str
    files: int
    wall_s: float
    cpu_s: dict[str, float]  # by role, drop → every run ended
    idle_cpu_per_s: float
    peak: dict[str, int]
    pss_by_role: dict[str, dict[str, int]]  # "idle" (before the drop) and "at_peak": bytes by role
    runs: list[RunTimes]
    other_runs: Counter
    load: str


class Deployment:
    """The deployment on a fresh instance, store and prefix, and the means to read them."""

    def __init__(self, root: Path, s3_url: str, launcher: str) -> None:
        self.root, self.launcher = root, launcher
        self.env = product_environment(root, s3_url)
        self.home = root / "dagster_home"
        self.home.mkdir(parents=True)
        self.env["BATCH_FILES"] = str(launcher == "batch").lower()  # warm and default: one run per file
        config = instance_config(MAX_CONCURRENCY, self.home / "storage", warm_runs=launcher != "default")
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = root / "dagster-dev.log"
        self.proc: subprocess.Popen | None = None
        self.sampler: TreeSampler | None = None

    @property
    def watch(self) -> Path:
        return Path(self.env["WATCH_PATH"])

    def start(self, stack: ExitStack) -> None:
        """In a process group of its own, its cwd the temporary directory (the product
        reads `.env` from its cwd); PYTHONPATH makes it load this checkout's code."""
        import dagster as dg

        from s3proc_dagster.stores.sqlite import SQLiteProgressStore

        port = free_port()
        env = {**os.environ, **self.env, "DAGSTER_HOME": str(self.home), "PYTHONPATH": str(ROOT)}
        if self.launcher == "default":  # Dagster's own launcher, under Dagster's own `dagster dev`
            cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"), "-p", str(port)]
        else:  # what `scripts/dev` runs: `s3proc dev`, its Dagster services without `dagster dev`
            shutil.copy(ROOT / "workspace.yaml", self.root / "workspace.yaml")
            cmd = [sys.executable, "-m", "s3proc_dagster.cli", "dev", "--port", str(port)]
        with self.log.open("ab") as log:
            self.proc = start_in_own_group(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(self.stop)
        try:
            wait_for_ui(self.proc, "127.0.0.1", port)
        except ServerStartError as exc:
            raise BenchmarkError(f"{exc}; see {self.log} (--keep keeps it)") from None
        self.sampler = TreeSampler(self.proc.pid)
        self.sampler.start()
        self.instance = dg.DagsterInstance.from_config(str(self.home))
        stack.callback(self.instance.dispose)
        self.store = SQLiteProgressStore(self.env["PROGRESS_DB_PATH"])
        stack.callback(self.store.close)
        self.wait(lambda: self.ticks(after=0.0), 180, f"{WATCH_SENSOR}'s first tick")

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.proc is not None:
            stop_process_group(self.proc, DAGSTER_STOP_DEADLINE_S, signal.SIGINT)
            self.proc = None

    def wait(self, done: Callable[[], Any], deadline_s: float, what: str) -> Any:
        """Until `done()` is truthy; says every 30 s what the runs are doing."""
        started = last_said = time.monotonic()
        while not (result := done()):
            if self.proc is None or self.proc.poll() is not None:
                raise BenchmarkError(f"the deployment exited; see {self.log} (--keep keeps it)")
            now = time.monotonic()
            if now - started > deadline_s:
                raise BenchmarkError(f"no {what} within {deadline_s:.0f} s; runs: {dict(self.run_counts(0))}")
            if now - last_said > 30:
                say(
                    f"  {now - started:.0f} s, waiting for {what}; runs: {dict(self.run_counts(time.time() - now + started))}"
                )
                last_said = now
            time.sleep(0.25)  # polling interval, bounded by the deadline
        return result

    def ticks(self, after: float) -> list[Any]:
        from dagster._core.scheduler.instigation import InstigatorType

        states = self.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        return [
            tick
            for state in states
            if state.name == WATCH_SENSOR
            for tick in self.instance.get_ticks(state.instigator_origin_id, state.selector_id, after=after)
        ]

    def run_counts(self, since: float, exclude: set[str] = frozenset()) -> Counter:
        """Runs created since `since` by job, origin and status: what a stuck benchmark
        reports, and the runs besides the files' (reports refreshes, recovery, retries)."""
        import dagster as dg

        counts: Counter = Counter()
        for record in self.instance.get_run_records(dg.RunsFilter(created_after=_utc(since))):
            run = record.dagster_run
            if run.run_id not in exclude:
                origin = run.tags.get("dagster/sensor_name") or run.tags.get("dagster/schedule_name") or "launched"
                counts[f"{run.job_name} ({origin}, {run.status.value})"] += 1
        return counts

    def drop(self, generated: Path, relative: Sequence[str]) -> Variant:
        """All files renamed in at once (the folders exist, so each file appears whole);
        until all are COMPLETED and their runs have ended."""
        import dagster as dg

        outside = self.root / "outside"  # same file system: a rename, not a copy
        copy_files(generated, outside, relative)
        for rel in relative:
            (self.watch / rel).parent.mkdir(parents=True, exist_ok=True)
        idle, idle_at = self.sampler.by_role().total(), time.monotonic()
        time.sleep(IDLE_S)
        before, load_before = self.sampler.by_role(), load()
        idle_cpu = (before.total() - idle) / (time.monotonic() - idle_at)
        idle_pss = dict(self.sampler.pss_by_role_at_peak)  # started and idle, before any run
        self.sampler.peak, self.sampler.pss_by_role_at_peak = dict.fromkeys(self.sampler.peak, 0), {}
        say(f"{self.launcher}: dropping {len(relative)} files (idle: {idle_cpu:.2f} CPU-s/s; load {load_before})")
        arrivals = {}
        for rel in relative:
            os.rename(outside / rel, self.watch / rel)
            arrivals[str((self.watch / rel).resolve())] = time.time()

        def completed() -> dict[str, Any]:
            files = {f.file_path: f for f in self.store.list_files() if f.file_path in arrivals}
            failed = [f"{path}: {f.error_details}" for path, f in files.items() if f.status.value == "failed"]
            if failed:
                raise BenchmarkError("FAILED:\n  " + "\n  ".join(failed))
            done = {path: f for path, f in files.items() if f.status.value == "completed"}
            return done if len(done) == len(arrivals) else {}

        done = self.wait(completed, DEADLINE_BASE_S + SECONDS_PER_FILE * len(relative), "COMPLETED for every file")
        run_ids = sorted({f.run_id for f in done.values()})  # a batch run holds several files
        ended = dg.RunsFilter(run_ids=run_ids, statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE])
        self.wait(lambda: self.instance.get_runs_count(ended) == len(run_ids), 120, "end of every run")
        time.sleep(2 * SAMPLE_S)  # the last sample after the last worker exited
        after = self.sampler.by_role()
        first = min(arrivals.values())
        say(f"{self.launcher}: all {len(relative)} COMPLETED; reading the instance (load {load()})")
        runs = self.read_runs(done, arrivals, first)
        return Variant(
            launcher=self.launcher,
            files=len(relative),
            wall_s=max(r.completed for r in runs) - first,
            cpu_s={name: after[name] - before[name] for name in after if after[name] - before[name] > 0.005},
            idle_cpu_per_s=idle_cpu,
            peak=dict(self.sampler.peak),
            pss_by_role={"idle": idle_pss, "at_peak": dict(self.sampler.pss_by_role_at_peak)},
            runs=runs,
            other_runs=self.run_counts(first, exclude=set(run_ids)),
            load=f"{load_before} → {load()}",
        )

    def read_runs(self, done: dict[str, Any], arrivals: dict[str, float], since: float) -> list[RunTimes]:
        import dagster as dg

        tick_of = {run_id: tick.timestamp for tick in self.ticks(after=since - 5) for run_id in tick.run_ids}
        records = self.instance.get_run_records(dg.RunsFilter(run_ids=[f.run_id for f in done.values()]))
        by_id = {r.dagster_run.run_id: r for r in records}
        runs = []
        for path, status in done.items():
            record = by_id[status.run_id]
            run = RunTimes(status.run_id, arrivals[path], status.completed_at.timestamp(), tick_of.get(status.run_id))
            run.created, run.end = record.create_timestamp.timestamp(), record.end_time
            read_events(run, self.instance.all_logs(status.run_id))
            runs.append(run)
        return runs


def _utc(epoch: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC)


def read_events(run: RunTimes, entries: Sequence[Any]) -> None:
    starts: dict[str, float] = {}
    for entry in entries:
        event, at = entry.dagster_event, entry.timestamp
        kind = event.event_type.name if event else "log message"
        run.events[kind] += 1
        if kind in ("RUN_DEQUEUED", "RUN_STARTING") and run.dequeued is None:
            run.dequeued = at
        elif kind == "ENGINE_EVENT" and (event.message or "").startswith("Started process for run"):
            run.worker_up = run.worker_up or at
        elif kind == "RUN_START":
            run.started = run.started or at
        elif kind == "STEP_START":
            starts.setdefault(entry.step_key, at)
        elif kind == "STEP_SUCCESS" and entry.step_key in starts:
            run.steps[entry.step_key] = (starts[entry.step_key], at)
        elif kind.startswith("HOOK_") and entry.step_key:
            run.hooks[entry.step_key] = at


# ---- the per-run breakdown ------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)] if ordered else float("nan")


def ordered_steps(run: RunTimes) -> list[tuple[str, float, float]]:
    return sorted(((key, s, e) for key, (s, e) in run.steps.items()), key=lambda step: step[1])


def stage(runs: Sequence[RunTimes], measure: Callable[[RunTimes], float]) -> list[float]:
    """`measure` of every run that has what it needs (a missing moment leaves it out)."""
    values = []
    for run in runs:
        with suppress(TypeError, KeyError, IndexError):
            values.append(measure(run))
    return values


def breakdown(runs: Sequence[RunTimes]) -> list[tuple[str, list[float]]]:
    """Where a file's time goes, in the order things happen."""
    rows = [
        # a tick waits for arrivals (`sources.watch.wait_for_ready`): the one that requested a
        # file's run often began before the file arrived, so its start is no stage of the file's
        ("arrival → run created (the sensor's request)", stage(runs, lambda r: r.created - r.arrival)),
        ("created → dequeued", stage(runs, lambda r: r.dequeued - r.created)),
        ('dequeued → worker up ("Started process for run")', stage(runs, lambda r: r.worker_up - r.dequeued)),
        ("worker up → RUN_START", stage(runs, lambda r: r.started - r.worker_up)),
        ("RUN_START → first STEP_START", stage(runs, lambda r: ordered_steps(r)[0][1] - r.started)),
    ]
    rows += [(f"  {s}", stage(runs, lambda r, s=s: r.steps[s][1] - r.steps[s][0])) for s in STEPS]
    rows += [
        ("  the 7 steps, sum", stage(runs, lambda r: sum(e - s for _, s, e in ordered_steps(r)))),
        (
            "  STEP_SUCCESS → its hook event, sum",
            stage(runs, lambda r: sum(r.hooks[k] - e for k, _, e in ordered_steps(r))),
        ),
        (
            "  hook event → next STEP_START, sum",
            stage(runs, lambda r: sum(b[1] - r.hooks[a[0]] for a, b in itertools.pairwise(ordered_steps(r)))),
        ),
        ("last hook event → run end", stage(runs, lambda r: r.end - r.hooks[ordered_steps(r)[-1][0]])),
        ("RUN_START → run end", stage(runs, lambda r: r.end - r.started)),
        ("arrival → COMPLETED", stage(runs, lambda r: r.completed - r.arrival)),
    ]
    return [(name, values) for name, values in rows if values]


def in_flight(runs: Sequence[RunTimes]) -> tuple[float, int]:
    """Mean and peak number of runs between dequeue and end."""
    spans = [(r.dequeued, r.end) for r in runs if r.dequeued and r.end]
    window = max(e for _, e in spans) - min(s for s, _ in spans)
    level = peak = 0
    for _, delta in sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans]):
        level += delta
        peak = max(peak, level)
    return sum(e - s for s, e in spans) / window, peak


# ---- the one-process baseline -------------------------------------------------------------------------


def baseline_worker(spec_path: Path) -> int:
    """The child of `run_baseline`: every file through the `pipeline` package's steps in order, as
    the ops call them, with one store, one S3 client and one claimant for all."""
    spec = json.loads(spec_path.read_text())
    os.environ.update(spec["env"])
    from s3proc_dagster import pipeline
    from s3proc_dagster.settings import load_configuration
    from s3proc_dagster.sources.resolve import resolve_source
    from s3proc_dagster.stores import open_store
    from s3proc_dagster.transfer.client import client_for

    cfg = load_configuration(env_file=None)
    processing, staging, prefix = cfg.processing, cfg.processing.staging_directory, cfg.s3.prefix
    store, client = open_store(processing), client_for(cfg.s3)
    claimant = pipeline.Claimant("baseline", lambda other: other == "baseline")
    ctx = pipeline.StepContext(store, claimant, staging, client, cfg.s3.bucket, prefix, processing.error_directory)
    recipe = pipeline.ConversionRecipe.of(cfg)
    release = not processing.staging_retention.total_seconds()
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for path in spec["files"]:
        version = pipeline.take_snapshot(ctx, resolve_source(path, cfg.monitoring.watch_path))
        detection = pipeline.detect_type(ctx, version)
        items = pipeline.plan_work(ctx, version, detection)
        prepared = pipeline.convert_items(ctx, version, items, recipe)
        for _ in pipeline.upload_items(ctx, version, prepared):
            pass
        pipeline.verify_items(ctx, version, prepared)
        pipeline.finish(ctx, version, prepared, release)
    wall, usage = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    completed = sum(f.status.value == "completed" for f in store.list_files())
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    Path(spec["result"]).write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "completed": completed}))
    return 0


def run_baseline(root: Path, s3_url: str, generated: Path, relative: Sequence[str]) -> dict[str, Any]:
    """In a child process (its own CPU and peak RSS), in a group of its own, stopped with
    everything else on an interrupt."""
    env = product_environment(root, s3_url)
    copy_files(generated, Path(env["WATCH_PATH"]), relative)
    spec = {"env": env, "files": [env["WATCH_PATH"] + "/" + rel for rel in relative], "result": str(root / "r.json")}
    (root / "spec.json").write_text(json.dumps(spec))
    load_before = load()
    say(f"one process: {len(relative)} files through the pipeline package (load {load_before})")
    with (root / "worker.log").open("wb") as log:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(root / "spec.json")]
        proc = start_in_own_group(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:
            stop_process_group(proc)
    if proc.returncode != 0:
        raise BenchmarkError(f"the one-process baseline exited with {proc.returncode}; see {root / 'worker.log'}")
    result = json.loads((root / "r.json").read_text())
    if result["completed"] != len(relative):
        raise BenchmarkError(f"the one-process baseline completed {result['completed']} of {len(relative)} files")
    return {
        "files": len(relative),
        "files_per_s": round(len(relative) / result["wall_s"], 2),
        "wall_s": round(result["wall_s"], 2),
        "cpu_s_per_file": round(result["cpu_s"] / len(relative), 4),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "load": f"{load_before} → {load()}",
    }


# ---- the report ----------------------------------------------------------------------------------------


def figures(v: Variant, baseline: dict[str, Any] | None) -> dict[str, Any]:
    latency = [r.completed - r.arrival for r in v.runs]
    once = list({r.run_id: r for r in v.runs}.values())  # a batch run's events once, not once per file
    events = [sum(r.events.values()) for r in once]
    kinds: Counter = Counter()
    for run in once:
        kinds.update(run.events)
    mean, peak = in_flight(v.runs)
    out = {
        "launcher": v.launcher,
        "files": v.files,
        "files_per_s": round(v.files / v.wall_s, 3),
        "wall_s": round(v.wall_s, 1),
        "latency_p50_s": round(pct(latency, 50), 1),
        "latency_p95_s": round(pct(latency, 95), 1),
        "cpu_s_per_file": round(sum(v.cpu_s.values()) / v.files, 2),
        "cpu_s_per_file_by_role": {k: round(c / v.files, 3) for k, c in sorted(v.cpu_s.items(), key=lambda x: -x[1])},
        "idle_cpu_s_per_s": round(v.idle_cpu_per_s, 2),
        "peak_rss_mb": round(v.peak["rss"] / 2**20),
        "peak_pss_mb": round(v.peak["pss"] / 2**20),
        "peak_processes": v.peak["processes"],
        "pss_mb_by_role": {
            when: {k: round(b / 2**20) for k, b in sorted(held.items(), key=lambda x: -x[1])}
            for when, held in v.pss_by_role.items()
        },
        "events_per_run_p50": pct(events, 50),
        "events_per_run_max": max(events),
        "runs": len(once),
        "events_per_run_by_type": {k: round(n / len(once), 1) for k, n in kinds.most_common()},
        "runs_in_flight_mean": round(mean, 2),
        "runs_in_flight_peak": peak,
        "sensor_ticks": len({r.tick for r in v.runs if r.tick}),
        "other_runs": dict(v.other_runs),
        "load_1_5_15": v.load,
        "breakdown_s": {name: [round(pct(x, 50), 2), round(pct(x, 95), 2)] for name, x in breakdown(v.runs)},
    }
    if baseline:
        out["ratio_to_one_process"] = round(out["files_per_s"] / baseline["files_per_s"], 4)
    return out


def print_report(results: list[dict[str, Any]], baseline: dict[str, Any] | None, command: str) -> None:
    """Markdown, ready for docs/performance.md."""
    print(f"\n`{command}` ({os.cpu_count()} cores, MAX_CONCURRENCY={MAX_CONCURRENCY})\n")
    cols = [f"{r['launcher']} launcher, {r['files']} files" for r in results]
    print("| | " + " | ".join(cols) + (f" | one process, {baseline['files']} files |" if baseline else " |"))
    print("|---" * (len(cols) + 1 + bool(baseline)) + "|")
    b = baseline or {}
    rows = [
        ("files/s", "files_per_s", b.get("files_per_s")),
        ("runs", "runs", None),
        ("ratio to one process", "ratio_to_one_process", 1 if baseline else None),
        ("latency p50 / p95, arrival → COMPLETED (s)", ("latency_p50_s", "latency_p95_s"), None),
        ("CPU-s per file", "cpu_s_per_file", b.get("cpu_s_per_file")),
        ("peak RSS / PSS of the tree (MB)", ("peak_rss_mb", "peak_pss_mb"), b.get("peak_rss_mb")),
        ("event log rows per run, p50", "events_per_run_p50", None),
        ("runs in flight, mean / peak", ("runs_in_flight_mean", "runs_in_flight_peak"), None),
        ("idle CPU-s per s", "idle_cpu_s_per_s", None),
        ("load average (1/5/15 min), start → end", "load_1_5_15", b.get("load")),
    ]
    for name, key, one in rows:
        cells = [" / ".join(str(r.get(k)) for k in key) if isinstance(key, tuple) else str(r.get(key)) for r in results]
        print(f"| {name} | " + " | ".join(cells) + (f" | {'' if one is None else one} |" if baseline else " |"))
    for r in results:
        print(f"\n{r['launcher']} launcher: CPU-s per file by role: " + ", ".join(
            f"{k} {c}" for k, c in r["cpu_s_per_file_by_role"].items()))  # fmt: skip
        for when, held in r["pss_mb_by_role"].items():
            print(f"PSS by role, {when} (MB): " + ", ".join(f"{k} {mb}" for k, mb in held.items()))
        print("events per run by type: " + ", ".join(f"{k} {n}" for k, n in r["events_per_run_by_type"].items()))
        print(f"sensor ticks that requested the runs: {r['sensor_ticks']}; other runs meanwhile: {r['other_runs']}")
    print("\n| per run, p50 / p95 s | " + " | ".join(r["launcher"] for r in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for name in results[0]["breakdown_s"]:
        cells = [" / ".join(map(str, r["breakdown_s"].get(name, ["-"]))) for r in results]
        print(f"| {name} | " + " | ".join(cells) + " |")


# ---- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300, help="files dropped at once (default 300)")
    parser.add_argument(
        "--launcher",
        default="warm",
        help="instance variants in order, comma-separated, each warm, default or batch (warm, and small "
        "files share runs under the backlog), optionally :FILES (default: warm); e.g. warm,batch,default:60",
    )
    parser.add_argument("--seed", type=int, default=14, help="seed of the generated files (default 14)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, instances)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    parser.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = []
    for item in args.launcher.split(","):
        name, _, count = item.strip().partition(":")
        if name not in LAUNCHERS or (count and not count.isdigit()) or int(count or args.files) < 1:
            parser.error(f"--launcher {item!r}: expected warm, default or batch, optionally :FILES")
        args.variants.append((name, int(count or args.files)))
    return args


def measure(args: argparse.Namespace, root: Path, stack: ExitStack) -> tuple[list[dict], dict | None]:
    files = max(n for _, n in args.variants)
    generated = root / "generated"
    relative = generate(generated, files, args.seed)
    seaweed = start_seaweedfs(root / "seaweedfs", ACCESS_KEY, SECRET_KEY, BUCKET)
    stack.callback(seaweed.stop)
    results = []
    for i, (launcher, count) in enumerate(args.variants):
        with ExitStack() as deployment_stack:
            deployment = Deployment(root / f"{i}-{launcher}", seaweed.url, launcher)
            say(f"{launcher}: starting the deployment (load {load()})")
            deployment.start(deployment_stack)
            results.append(deployment.drop(generated, relative[:count]))
        say(json.dumps(figures(results[-1], None)))  # an interrupted comparison keeps what it measured
        # dagster dev is stopped: the next variant and the baseline get the machine it had
    baseline = run_baseline(root / "baseline", seaweed.url, generated, relative)
    return [figures(v, baseline) for v in results], baseline


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(Path(args.baseline_worker))

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)  # through the cleanup, never around it

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    session = os.environ[SESSION_ENV] = f"throughput-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # all we start inherit it
    root = Path(tempfile.mkdtemp(prefix="s3proc-throughput-")).resolve()
    results, baseline, error = [], None, None
    try:
        with ExitStack() as stack:
            if args.keep:
                stack.callback(say, f"kept {root}")
            else:
                stack.callback(shutil.rmtree, root, ignore_errors=True)
            # runs first on the way out: a second Ctrl-C must not cut the cleanup short
            stack.callback(lambda: [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)])
            results, baseline = measure(args, root, stack)
    except KeyboardInterrupt as stop:
        error = stop
        say(f"\ninterrupted ({stop or 'SIGINT'}): everything the benchmark started has been stopped")
    except Exception as exc:  # still look for leftovers, then say what broke
        error = exc
        say(f"\nFAILED: {exc}" if isinstance(exc, BenchmarkError) else f"\nERROR:\n{traceback.format_exc()}")
    left = find_leftovers(session, grace_s=10.0)
    if left:
        say("still running after the cleanup (now killed):\n  " + "\n  ".join(describe(p) for p in left))
        kill(left)
    command = "benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(
            json.dumps(
                {"command": command, "variants": results, "one_process": baseline, "error": str(error or "") or None},
                indent=2,
            )
        )
    elif results:
        print_report(results, baseline, command)
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1 if error or left else 0


if __name__ == "__main__":
    sys.exit(main())
