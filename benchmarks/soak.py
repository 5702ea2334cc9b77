"""Fault-injection soak: kill -9 at random points, S3 faults, and checks after each.

    .venv/bin/python benchmarks/soak.py                          # 10 trials, 600,000 rows, a 2 GiB file
    .venv/bin/python benchmarks/soak.py --trials 3 --rows 200000 --big-mib 256
    .venv/bin/python benchmarks/soak.py --scenarios 1,4 --seed 7 --keep

Everything runs against a throwaway deployment that the script starts and stops itself:
SeaweedFS (`embedded.start_seaweedfs`) in a temporary directory, the fault-injecting proxy
the tests use too in front of it (`s3_proxy.FaultyS3Proxy`), the tests' own product
environment (`support.product_env`) and a `DAGSTER_HOME` written by `dev.write_instance`. The product is
driven the way users drive it: `python -m s3proc_dagster.cli process FILE` in processes
of their own (killed with SIGKILL, never asked to stop), `python -m dagster job execute
-m s3proc_dagster.definitions -j reconcile_job` for crash recovery, `s3proc status --json`
for what the store says. Only the judging is done in this process: S3 listings, the
Dagster instance's run records and event log, DuckDB over the source and over the parts
the dataset's `_manifest.json` lists.

Scenarios (`--scenarios`, default all):
  1. kill -9 trials: one clean run of a CSV measures its duration D; each trial processes
     a fresh copy, kills it at a uniformly random point of [0, D], reconciles, runs it
     again and checks the dataset, S3 and both stores;
  2. the file rewritten with the same number of rows and other values;
  3. a crash while a new, shorter version lands (caught mid-upload by the proxy's stall);
  4. a big regular file killed once about 70 % of its parts are in S3, then resumed;
  5. an S3 outage in the middle of a multipart upload;
  6. two runs of one file started at once.

Every check prints a PASS or FAIL line; the script ends with "N of M checks passed" and a
table of figures, and exits 1 if any check failed. Every process it starts is stopped
with a deadline and SIGKILL fallback (`embedded.stop_process_group`), also on Ctrl-C,
SIGTERM or an error; the temporary directory goes too unless `--keep`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dagster as dg
import duckdb

from benchmarks.s3_proxy import FaultyS3Proxy
from benchmarks.support import (
    Deployment,
    S3Endpoint,
    dataset_keys,
    list_keys,
    open_uploads,
    product_env,
    promo_rows,
    wait_for,
    write_csv,
)
from s3proc_dagster.cli.embedded import start_seaweedfs
from s3proc_dagster.cli.leftovers import SESSION_ENV, describe, find_leftovers, kill
from s3proc_dagster.cli.processes import start_in_own_group, stop_process_group
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.runs.instance import write_instance
from s3proc_dagster.runs.liveness import IN_FLIGHT, START_GRACE_S, last_beat
from s3proc_dagster.stores.sqlite import SQLiteProgressStore
from s3proc_dagster.transfer.manifest import (
    is_intact,
    part_key,
    read_manifest,
    version_folder,
)
from s3proc_dagster.transfer.upload import PART_SIZE

ACCESS_KEY, SECRET_KEY, BUCKET, PREFIX = "soak", "soak-secret-do-not-log", "soak", "soak"
CHUNK_SIZE = 50_000
#: One `s3proc process` may take this long per MiB of input (plus a minute) before it
#: counts as hung; generous, because the machine is shared and a hang must still end.
SECONDS_PER_MIB = 2.0
CODE_LOCATION_MODULE = "s3proc_dagster.definitions"  # pyproject's [tool.dagster] module_name
S = dg.DagsterRunStatus


# ---- checks -------------------------------------------------------------------------------------


@dataclass
class Checks:
    """Every check's outcome, printed as it is made so a long soak shows progress."""

    scenario: str = ""
    results: list[tuple[str, str, bool]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((self.scenario, name, ok))
        print(f"    {'PASS' if ok else 'FAIL'}  {name}" + (f"  [{detail}]" if detail else ""), flush=True)
        return ok

    @property
    def failed(self) -> int:
        return sum(not ok for _, _, ok in self.results)


@dataclass(frozen=True)
class Fingerprint:
    """What "the same data" means here: row count, sum of `seq`, distinct users, and the
    sum of a hash of every row (order-free, so the source and the parts compare directly)."""

    rows: int
    seq_sum: int
    users: int
    row_hash: int

    def __str__(self) -> str:
        return f"{self.rows} rows, sum(seq) {self.seq_sum}, {self.users} users, hash {self.row_hash % 10**8:08d}"


FINGERPRINT_SQL = (
    "SELECT count(*), coalesce(sum(seq), 0), count(DISTINCT userId), "
    "coalesce(sum(hash(userId, promoCode, offerExpiry, amount, seq)::HUGEINT), 0) FROM {relation}"
)


def csv_fingerprint(path: Path) -> Fingerprint:
    """The source read by DuckDB with the same inference the product's conversion uses."""
    return Fingerprint(*duckdb.execute(FINGERPRINT_SQL.format(relation="read_csv($1)"), [str(path)]).fetchone())


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    out: Path  # stdout: what the command answers (status --json, process's result line)
    err: Path  # stderr: the product's and Dagster's log lines
    started: float

    def err_tail(self, lines: int = 12) -> str:
        text = self.err.read_text(errors="replace").splitlines() if self.err.exists() else []
        return "\n".join("        | " + line for line in text[-lines:])


@dataclass(frozen=True)
class Finished:
    returncode: int | None  # None: it did not finish in time and was stopped
    seconds: float
    run: Running


# ---- the deployment ---------------------------------------------------------------------------------


class Soak:
    """One throwaway deployment and the means to drive and judge it.

    The product reads its settings once per process, as in production, so each command is
    a fresh process with the environment below; `via_proxy` points a command's S3 at the
    fault-injecting proxy, which the fault scenarios need and the kill trials do not (the
    trials measure the product, not a Python proxy's throughput).
    """

    def __init__(self, root: Path, stack: ExitStack, checks: Checks) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.checks = checks
        self.live: set[subprocess.Popen] = set()
        self._commands = 0

        server = start_seaweedfs(root / "seaweedfs", ACCESS_KEY, SECRET_KEY, BUCKET)
        stack.callback(server.stop)
        self.proxy = FaultyS3Proxy(server.url)
        # A killed client leaves the proxy mid-request (broken pipe, reset): expected here,
        # so not worth the traceback socketserver prints for each by default.
        self.proxy.server.handle_error = lambda request, client_address: None
        stack.callback(self.proxy.stop)
        s3 = S3Endpoint(server.url, ACCESS_KEY, SECRET_KEY, BUCKET, server)
        env = {
            **product_env(root, s3, PREFIX),
            "CHUNK_SIZE": str(CHUNK_SIZE),
            # the product's defaults, not the tests' fast-failing ones: a soak runs it as deployed
            "MAX_RETRIES": "3",
            "RETRY_DELAY_MS": "1000",
            "VALIDATION_AS_OF": "2026-01-01",  # the promotions rules judge expiry against a fixed day
            "REPORTS_AUTO_REFRESH": "false",
            "DAGSTER_HOME": str(root / "dagster_home"),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        write_instance(Path(env["DAGSTER_HOME"]), max_concurrency=2)
        self.deployment = Deployment(root, env, s3, self.proxy)
        self.client = s3.client()
        self.instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
        stack.callback(self.instance.dispose)
        stack.callback(self.stop_all)  # runs first: processes go before the servers they use

    @property
    def watch(self) -> Path:
        return self.deployment.watch

    # -- processes ----------------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], via_proxy: bool = False) -> Running:
        """`python ARGS` in a process group of its own, output to files (a long run's logs
        would fill a pipe nobody reads and stall it), remembered until it is reaped."""
        self._commands += 1
        stem = self.logs / f"{self._commands:03d}-{name}"
        env = {**os.environ, **self.deployment.env}
        if via_proxy:
            env["S3_ENDPOINT"] = self.proxy.url
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            proc = start_in_own_group([sys.executable, *args], cwd=self.root, env=env, stdout=out, stderr=err)
        self.live.add(proc)
        return Running(name, proc, Path(f"{stem}.out"), Path(f"{stem}.err"), time.monotonic())

    def start_process(self, path: Path, name: str, via_proxy: bool = False) -> Running:
        return self.spawn(name, ["-m", "s3proc_dagster.cli", "process", str(path)], via_proxy)

    def wait(self, running: Running, timeout: float) -> Finished:
        try:
            code: int | None = running.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(running.proc)
            code = None
        self.live.discard(running.proc)
        return Finished(code, time.monotonic() - running.started, running)

    def kill9(self, running: Running) -> None:
        """SIGKILL to the command's whole group: no handler, no cleanup, as the OOM killer does it."""
        with suppress(ProcessLookupError):
            os.killpg(running.proc.pid, signal.SIGKILL)
        running.proc.wait(timeout=30)
        self.live.discard(running.proc)

    def stop_all(self) -> None:
        for proc in list(self.live):
            stop_process_group(proc, deadline_s=10.0)
            self.live.discard(proc)

    def process(self, path: Path, name: str, via_proxy: bool = False, timeout: float | None = None) -> Finished:
        """One `s3proc process` to its end; a non-zero exit prints the tail of its log."""
        timeout = timeout or 60 + SECONDS_PER_MIB * path.stat().st_size / (1 << 20)
        done = self.wait(self.start_process(path, name, via_proxy), timeout)
        if done.returncode != 0:
            print(f"    s3proc process {path.name} exited {done.returncode}; its log ends:\n{done.run.err_tail()}")
        return done

    def processed_ok(self, done: Finished, what: str) -> bool:
        return self.checks.check(
            f"{what} exits 0", done.returncode == 0, f"exit {done.returncode}, {done.seconds:.1f} s"
        )

    # -- the product's view -------------------------------------------------------------------------

    def status(self, path: Path) -> dict[str, Any] | None:
        """The file's record as `s3proc status FILE --json` prints it, or None."""
        done = self.wait(self.spawn("status", ["-m", "s3proc_dagster.cli", "status", str(path), "--json"]), 120)
        try:
            found = json.loads(done.run.out.read_text() or "[]")
        except ValueError:
            return None
        return found[0] if found else None

    def status_is(self, path: Path, wanted: str) -> bool:
        record = self.status(path)
        got = record["status"] if record else "no record"
        return self.checks.check(f"`s3proc status` says {wanted.upper()}", got == wanted, f"status {got}")

    def reconcile(self) -> bool:
        """reconcile_job as a user runs it by hand, from the product's code location.

        `dagster job execute` prints nothing of the run, so the proof that reconcile ran is
        read back from the instance: a new reconcile_job run, SUCCESS, whose `reconcile`
        step succeeded, loaded from the product's module (the run's code pointer). Its log
        lines (what it reaped and settled) are printed and kept with the command's output.
        """
        before = {r.dagster_run.run_id for r in self.runs("reconcile_job")}
        args = ["-m", "dagster", "job", "execute", "-m", CODE_LOCATION_MODULE, "-j", "reconcile_job"]
        done = self.wait(self.spawn("reconcile", args), 300)
        new = [r.dagster_run for r in self.runs("reconcile_job") if r.dagster_run.run_id not in before]
        run = new[0] if len(new) == 1 else None
        steps = (
            {e.step_key for e in self.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
            if run
            else set()
        )
        if run:
            said = [e.user_message for e in self.instance.all_logs(run.run_id) if not e.is_dagster_event]
            with done.run.out.open("a") as out:
                out.write("".join(f"{line}\n" for line in said))
            for line in said:
                print(f"      reconcile: {line.replace(str(self.watch) + '/', '')}")
        origin = run.job_code_origin if run else None
        module = getattr(origin.repository_origin.code_pointer, "module", None) if origin else None
        ok = (
            done.returncode == 0
            and run is not None
            and run.status is S.SUCCESS
            and "reconcile" in steps
            and module == CODE_LOCATION_MODULE
        )
        detail = (
            f"run {run.run_id[:8]} {run.status.value} from {module}, {done.seconds:.1f} s"
            if run
            else f"exit {done.returncode}, no run"
        )
        if not ok:
            print(done.run.err_tail())
        return self.checks.check("reconcile_job ran its reconcile step in the code location", ok, detail)

    def runs(self, job_name: str, **tags: str) -> list[dg.RunRecord]:
        """Oldest first."""
        records = self.instance.get_run_records(dg.RunsFilter(job_name=job_name, tags=tags or None))
        return sorted(records, key=lambda r: r.create_timestamp)

    def file_runs(self, path: Path) -> list[dg.DagsterRun]:
        return [r.dagster_run for r in self.runs("process_file_job", **{"s3proc/source": str(path)})]

    def run_state(self, run_id: str) -> tuple[dg.DagsterRunStatus, str]:
        """A run's status, and for one still in flight whether it ever beat: a run killed
        before its resources started the heartbeat counts as alive for START_GRACE_S."""
        status = self.instance.get_run_by_id(run_id).status
        text = status.value
        if status in IN_FLIGHT and last_beat(self.instance, run_id) is None:
            text += f" (no heartbeat: taken for alive until {START_GRACE_S:.0f} s after its start)"
        return status, text

    def last_step(self, run: dg.DagsterRun) -> str:
        """Where a killed run was: the last step it started, from the instance's event log."""
        if run.status is S.SUCCESS:
            return "after the run succeeded"
        starts = self.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        return starts[-1].step_key or "?" if starts else "run created, before its first step"

    @contextmanager
    def store(self) -> Iterator[SQLiteProgressStore]:
        store = self.deployment.store()
        try:
            yield store
        finally:
            store.close()

    def upload_tasks(self) -> list[str]:
        with self.store() as store:
            return [t.s3_key for t in store.list_upload_tasks()]

    # -- S3 -----------------------------------------------------------------------------------------

    def open_uploads(self, prefix: str) -> list[dict]:
        return open_uploads(self.deployment, prefix)

    def parts_in_s3(self, key: str) -> tuple[int, str | None]:
        """How many parts the (single) open upload to `key` holds, and its UploadId."""
        uploads = [u for u in self.open_uploads(key) if u["Key"] == key]
        if not uploads:
            return 0, None
        upload_id = uploads[0]["UploadId"]
        pages = self.client.get_paginator("list_parts").paginate(Bucket=BUCKET, Key=key, UploadId=upload_id)
        return sum(len(page.get("Parts", [])) for page in pages), upload_id

    def object_sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        for block in self.client.get_object(Bucket=BUCKET, Key=key)["Body"].iter_chunks(8 << 20):
            digest.update(block)
        return digest.hexdigest()

    def dataset_fingerprint(self, dataset: str) -> tuple[Fingerprint, int] | None:
        """The dataset as a reader finds it: the parts its committed `_manifest.json` lists.

        Also returns how many rows are out of place: each part holds the records
        [startOffset, endOffset] of the source, and the source's `seq` is the record's
        index, so `seq` must equal the part's startOffset plus the row's place in the part.
        """
        manifest = read_manifest(self.client, BUCKET, dataset)
        if manifest is None or not manifest.chunks:
            return None
        folder = self.root / "reads" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            offsets = []
            for part in sorted(manifest.chunks, key=lambda p: p.chunk_index):
                local = folder / f"part-{part.chunk_index:05d}.parquet"
                self.client.download_file(BUCKET, part.key, str(local))
                offsets.append((str(local), part.start_offset or 0))
            files = [path for path, _ in offsets]
            relation = "read_parquet($1)"
            fingerprint = Fingerprint(*duckdb.execute(FINGERPRINT_SQL.format(relation=relation), [files]).fetchone())
            (misplaced,) = duckdb.execute(
                "SELECT count(*) FROM read_parquet($1, filename = true, file_row_number = true) AS p "
                "JOIN (SELECT unnest($2) AS f, unnest($3) AS start) AS o ON p.filename = o.f "
                "WHERE p.seq <> o.start + p.file_row_number",
                [files, files, [start for _, start in offsets]],
            ).fetchone()
            return fingerprint, misplaced
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- checks shared by scenarios -----------------------------------------------------------------

    def check_dataset(self, dataset: str, source: Path, expected: Fingerprint, chunks: int | None = None) -> None:
        """The dataset is the source, whole, with nothing else under it."""
        manifest = read_manifest(self.client, BUCKET, dataset)
        sha = sha256_file(source)
        self.checks.check(
            "the manifest's fileSha256 is the source's",
            manifest is not None and manifest.file_sha256 == sha,
            f"manifest {manifest.file_sha256[:12] if manifest else None}, file {sha[:12]}",
        )
        read = self.dataset_fingerprint(dataset)
        got, misplaced = read if read else (None, None)
        self.checks.check(
            "the data read through _manifest.json equals the source (DuckDB)",
            got == expected and misplaced == 0,
            "no committed manifest"
            if read is None
            else f"{got}" + (f"; {misplaced} rows out of place" if misplaced else ""),
        )
        keys = list_keys(self.deployment, dataset + "/")
        vouched = sorted(manifest.vouched_keys()) if manifest else []
        stray = sorted(set(keys) ^ set(vouched))
        self.checks.check(
            "the keys under the dataset are exactly the manifest's (+ _manifest.json, symlink manifest)",
            keys == vouched and bool(keys),
            f"{len(keys)} keys" if not stray else f"differ: {stray[:4]}",
        )
        if chunks is not None:
            self.checks.check(
                f"the manifest lists {chunks} parts, all under this version's {version_folder(sha)}/",
                vouched == dataset_keys(dataset, sha, chunks),
                f"{len(manifest.chunks) if manifest else 0} parts",
            )

    def check_no_uploads_left(self, prefix: str) -> None:
        uploads = self.open_uploads(prefix)
        self.checks.check(f"no open multipart upload under {prefix}", not uploads, f"{len(uploads)} open")
        tasks = self.upload_tasks()
        self.checks.check("no upload task left in the store", not tasks, f"{len(tasks)}: {tasks[:2]}" if tasks else "")


# ---- data ---------------------------------------------------------------------------------------------


def write_promo_csv(path: Path, rows: int, seed: int) -> Fingerprint:
    """Rows shaped like the tests' (userId, promoCode, offerExpiry, amount, seq)."""
    write_csv(path, promo_rows(rows, seed=seed))
    return csv_fingerprint(path)


def write_random_file(path: Path, mib: int) -> str:
    """`mib` MiB of random bytes, written and hashed 8 MiB at a time (a 2 GiB file must
    not be held in memory); returns its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(mib // 8):
            block = os.urandom(8 << 20)
            digest.update(block)
            out.write(block)
        if tail := os.urandom((mib % 8) << 20):
            digest.update(tail)
            out.write(tail)
    return digest.hexdigest()


def copy_source(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


# ---- scenarios ----------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What the summary table reports."""

    clean_run_s: float = 0.0
    landings: list[str] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    resume: tuple[int, int, int] | None = None  # (parts sent after restart, total, kept in S3)
    wall_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Config:
    trials: int
    rows: int
    big_mib: int
    seed: int

    @property
    def chunks(self) -> int:
        return math.ceil(self.rows / CHUNK_SIZE)


def kill_trials(soak: Soak, cfg: Config, figures: Figures, source: Path, expected: Fingerprint) -> None:
    """N runs killed with SIGKILL at uniformly random points of a clean run's duration.

    Each trial gets a copy under a name of its own, so its dataset, record and staging
    work start fresh; only the source's bytes (and so the expected data) are shared.
    """
    clean = copy_source(source, soak.watch / "trials" / "promo-clean.csv")
    done = soak.process(clean, "clean")
    soak.processed_ok(done, "the clean run")
    soak.status_is(clean, "completed")
    soak.check_dataset(f"{PREFIX}/trials/promo-clean.csv", clean, expected, cfg.chunks)
    duration = figures.clean_run_s = done.seconds
    print(f"    clean run: D = {duration:.1f} s")

    rng = random.Random(cfg.seed)
    for trial in range(1, cfg.trials + 1):
        path = copy_source(source, soak.watch / "trials" / f"promo-trial-{trial:02d}.csv")
        at = rng.uniform(0, duration)
        print(f"  trial {trial}/{cfg.trials}: kill -9 at {at:.2f} s of {duration:.1f} s", flush=True)
        running = soak.start_process(path, f"trial-{trial:02d}")
        exited = _sleep_or_exit(running.proc, at)
        soak.kill9(running)
        killed = soak.file_runs(path)
        landing = (
            "exited before the kill"
            if exited
            else (soak.last_step(killed[-1]) if killed else "before its run was created")
        )
        figures.landings.append(landing)

        started = time.monotonic()
        soak.reconcile()
        rerun = soak.process(path, f"trial-{trial:02d}-rerun")
        recovery = time.monotonic() - started
        figures.recovery_s.append(recovery)
        print(f"    landed: {landing}; recovery (reconcile start -> rerun done) {recovery:.1f} s")

        soak.processed_ok(rerun, "the rerun")
        soak.status_is(path, "completed")
        soak.check_dataset(f"{PREFIX}/trials/{path.name}", path, expected, cfg.chunks)
        soak.check_no_uploads_left(f"{PREFIX}/")
        states = [soak.run_state(r.run_id) for r in killed]
        allowed = (
            {S.FAILURE, S.SUCCESS} if landing in ("after the run succeeded", "exited before the kill") else {S.FAILURE}
        )
        soak.checks.check(
            "the killed run shows FAILURE in the instance, not STARTED (SUCCESS if it had ended)",
            all(status in allowed for status, _ in states),
            ", ".join(text for _, text in states) or "killed before its run was created",
        )


def _sleep_or_exit(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait `seconds`; True if the process ended by itself meanwhile (nothing left to kill)."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def same_row_count(soak: Soak, cfg: Config, source: Path) -> None:
    """A rewrite that keeps the row count keeps every chunk's offsets: only the checksum
    tells the versions apart, so nothing of the first may be taken for the second."""
    path = copy_source(source, soak.watch / "samecount" / "promo.csv")
    dataset = f"{PREFIX}/samecount/promo.csv"
    soak.processed_ok(soak.process(path, "samecount-v1"), "processing v1")
    expected = write_promo_csv(path, cfg.rows, seed=cfg.seed + 2)
    soak.processed_ok(soak.process(path, "samecount-v2"), "processing v2 (same row count, other values)")
    soak.status_is(path, "completed")
    soak.check_dataset(dataset, path, expected, cfg.chunks)


def crash_during_new_version(soak: Soak, cfg: Config, source: Path, expected_v1: Fingerprint) -> None:
    """Killed while v2's parts go up: readers keep v1, recovery does not take v1's intact
    manifest for v2's, and the rerun lands v2 and removes v1."""
    path = copy_source(source, soak.watch / "vcrash" / "promo.csv")
    dataset = f"{PREFIX}/vcrash/promo.csv"
    soak.processed_ok(soak.process(path, "vcrash-v1"), "processing v1")
    v1 = sha256_file(path)

    v2_rows = max(cfg.rows - cfg.rows // 4, 1)
    expected_v2 = write_promo_csv(path, v2_rows, seed=cfg.seed + 3)
    v2, v2_chunks = sha256_file(path), math.ceil(v2_rows / CHUNK_SIZE)
    held = part_key(dataset, v2, min(2, v2_chunks - 1))
    soak.proxy.stalled.clear()
    soak.proxy.release.clear()
    soak.proxy.stall_containing = f"/{held}"
    running = soak.start_process(path, "vcrash-v2", via_proxy=True)
    try:
        wait_for(lambda: soak.proxy.stalled.is_set() or running.proc.poll() is not None, "v2's upload to be held", 600)
        caught = soak.proxy.stalled.is_set()
    finally:
        soak.kill9(running)
        soak.proxy.stall_containing = None
        soak.proxy.release.set()
    soak.checks.check(f"v2's run was caught uploading {held.rsplit('/', 1)[-1]} and killed", caught)

    manifest = read_manifest(soak.client, BUCKET, dataset)
    soak.checks.check(
        "after the kill, the committed manifest is still v1's and intact",
        manifest is not None and manifest.file_sha256 == v1 and is_intact(soak.client, BUCKET, manifest),
    )
    read = soak.dataset_fingerprint(dataset)
    soak.checks.check(
        "readers still see v1 whole through the manifest",
        read is not None and read[0] == expected_v1 and read[1] == 0,
        str(read[0]) if read else "no dataset",
    )
    soak.reconcile()
    soak.status_is(path, "pending")
    uploads = soak.open_uploads(dataset + "/")
    soak.checks.check("no open multipart upload under the dataset after reconcile", not uploads, f"{len(uploads)} open")

    soak.processed_ok(soak.process(path, "vcrash-rerun"), "the rerun")
    soak.status_is(path, "completed")
    soak.check_dataset(dataset, path, expected_v2, v2_chunks)
    left = [k for k in list_keys(soak.deployment, dataset + "/") if f"/{version_folder(v1)}/" in k]
    soak.checks.check("v1's objects are gone", not left, f"{len(left)} left")


def big_file_resume(soak: Soak, cfg: Config, figures: Figures) -> None:
    """A big plain file killed with most of its parts in S3 resumes instead of starting over.

    It goes through the proxy so that every part sent after the restart is counted."""
    path = soak.watch / "big" / "big.bin"
    sha = write_random_file(path, cfg.big_mib)
    key = f"{PREFIX}/big/big.bin"
    total = math.ceil(path.stat().st_size / PART_SIZE)
    target = math.ceil(0.7 * total)
    running = soak.start_process(path, "big", via_proxy=True)
    timeout = 60 + SECONDS_PER_MIB * cfg.big_mib
    try:
        wait_for(
            lambda: running.proc.poll() is not None or soak.parts_in_s3(key)[0] >= target,
            f"{target} of {total} parts in S3",
            timeout,
        )
    finally:
        soak.kill9(running)
    (killed,) = soak.file_runs(path) or [None]
    landing = soak.last_step(killed) if killed else "before its run was created"
    at_kill, upload_id = soak.parts_in_s3(key)
    soak.checks.check(
        f"killed in streaming with >= 70 % of the parts in S3 ({target} of {total})",
        landing == "streaming" and at_kill >= target,
        f"{landing}, {at_kill} parts",
    )

    soak.reconcile()
    soak.status_is(path, "pending")
    kept, kept_id = soak.parts_in_s3(key)
    soak.checks.check(
        "reconcile keeps this version's upload for the rerun",
        kept_id is not None and kept_id == upload_id,
        f"{kept} parts kept",
    )
    puts_before = len(soak.proxy.put_keys)
    done = soak.process(path, "big-rerun", via_proxy=True)
    sent = sum(k.endswith(f"/{key}") for k in soak.proxy.put_keys[puts_before:])
    figures.resume = (sent, total, kept)
    soak.processed_ok(done, "the rerun")
    soak.status_is(path, "completed")
    soak.checks.check(
        "the rerun resumed: parts sent after the restart are fewer than the total",
        0 < sent < total and sent <= total - kept,
        f"{sent} sent of {total}, {kept} already in S3",
    )
    said = re.search(r"resumed a multipart upload, (\d+) of (\d+) parts", done.run.err.read_text(errors="replace"))
    soak.checks.check(
        "the rerun's log says it resumed with the parts kept",
        said is not None and (int(said[1]), int(said[2])) == (kept, total),
        said[0] if said else "no resume line in the rerun's log",
    )
    got = soak.object_sha256(key)
    soak.checks.check("the object's bytes hash to the file's SHA-256", got == sha, f"{got[:12]} vs {sha[:12]}")
    soak.check_no_uploads_left(f"{PREFIX}/")


def outage_mid_upload(soak: Soak, cfg: Config) -> None:
    """S3 drops every connection for a while in the middle of a multipart upload."""
    path = soak.watch / "outage" / "outage.bin"
    sha = write_random_file(path, 200)
    key = f"{PREFIX}/outage/outage.bin"
    failed_before = soak.proxy.failed_requests
    soak.proxy.outage_after_puts = (f"/{key}", 8, 2.0)  # after eight parts, S3 is gone for 2 s
    try:
        done = soak.process(path, "outage", via_proxy=True)
    finally:
        soak.proxy.outage_after_puts = None
    dropped = soak.proxy.failed_requests - failed_before
    soak.checks.check("the outage happened (requests dropped by the proxy)", dropped > 0, f"{dropped} dropped")
    soak.processed_ok(done, "the run through the outage")
    soak.status_is(path, "completed")
    got = soak.object_sha256(key) if done.returncode == 0 else ""
    soak.checks.check("the object's bytes hash to the file's SHA-256", got == sha, f"{got[:12]} vs {sha[:12]}")
    soak.check_no_uploads_left(f"{PREFIX}/")


def two_runs_at_once(soak: Soak, cfg: Config, source: Path, expected: Fingerprint) -> None:
    """Two `s3proc process` of one file at once: one does the work, the other stands down."""
    path = copy_source(source, soak.watch / "twice" / "promo.csv")
    dataset = f"{PREFIX}/twice/promo.csv"
    puts_before = len(soak.proxy.put_keys)
    runs = [soak.start_process(path, f"twice-{i}", via_proxy=True) for i in (1, 2)]
    timeout = 120 + SECONDS_PER_MIB * path.stat().st_size / (1 << 20)
    done = [soak.wait(r, timeout) for r in runs]
    soak.checks.check("both runs exit 0", [d.returncode for d in done] == [0, 0], str([d.returncode for d in done]))
    parts = [k for k in soak.proxy.put_keys[puts_before:] if f"/{dataset}/" in k and "/part-" in k]
    repeated = sorted(k.rsplit("/", 1)[-1] for k, n in Counter(parts).items() if n > 1)
    soak.checks.check(
        "each part key was PUT exactly once",
        len(parts) == cfg.chunks and not repeated,
        f"{len(parts)} PUTs for {cfg.chunks} parts" + (f", repeated: {repeated}" if repeated else ""),
    )
    logs = "".join(d.run.err.read_text(errors="replace") for d in done)
    soak.checks.check(
        "the other run stood down",
        "is already processing this version" in logs or "unchanged" in logs,
    )
    soak.status_is(path, "completed")
    soak.check_dataset(dataset, path, expected, cfg.chunks)


# ---- the run ------------------------------------------------------------------------------------------


SCENARIOS = {
    "1": "kill -9 trials",
    "2": "same row count, other values",
    "3": "crash during a new version",
    "4": "big regular file resume",
    "5": "S3 outage mid-upload",
    "6": "two runs of one file at once",
}


def run_scenarios(soak: Soak, cfg: Config, figures: Figures, wanted: list[str]) -> None:
    source = soak.root / "source" / "promo.csv"
    started = time.monotonic()
    expected = write_promo_csv(source, cfg.rows, seed=cfg.seed + 1)
    print(f"source: {source.stat().st_size / (1 << 20):.1f} MiB, {expected} ({time.monotonic() - started:.1f} s)")
    steps: dict[str, Callable[[], None]] = {
        "1": lambda: kill_trials(soak, cfg, figures, source, expected),
        "2": lambda: same_row_count(soak, cfg, source),
        "3": lambda: crash_during_new_version(soak, cfg, source, expected),
        "4": lambda: big_file_resume(soak, cfg, figures),
        "5": lambda: outage_mid_upload(soak, cfg),
        "6": lambda: two_runs_at_once(soak, cfg, source, expected),
    }
    for key in wanted:
        title = f"{key}. {SCENARIOS[key]}"
        print(f"\n== {title}", flush=True)
        soak.checks.scenario = key
        started = time.monotonic()
        try:
            steps[key]()
        except Exception as exc:
            traceback.print_exc()
            soak.checks.check(f"scenario {key} ran to its end", False, f"{type(exc).__name__}: {exc}")
        finally:
            soak.stop_all()
            soak.proxy.stall_containing = soak.proxy.outage_after_puts = None
            soak.proxy.release.set()
        figures.wall_s[title] = time.monotonic() - started


def print_summary(checks: Checks, figures: Figures, cfg: Config) -> None:
    print("\n== summary")
    rows: list[tuple[str, str]] = []
    if figures.landings:
        landed = Counter(figures.landings)
        trials = (
            f"{len(figures.landings)} (seed {cfg.seed}), {cfg.rows:,} rows, clean run D = {figures.clean_run_s:.1f} s"
        )
        rows.append(("trials", trials))
        rows.append(("kills landed", ", ".join(f"{step} {n}" for step, n in landed.most_common())))
    if figures.recovery_s:
        r = figures.recovery_s
        rows.append(("recovery time", f"min {min(r):.1f} s, median {statistics.median(r):.1f} s, max {max(r):.1f} s"))
    if figures.resume:
        sent, total, kept = figures.resume
        rows.append(
            ("resume parts", f"{sent} sent after restart / {total} total ({kept} kept in S3, {cfg.big_mib} MiB)")
        )
    for title, seconds in figures.wall_s.items():
        rows.append((f"wall {title}", f"{seconds:.1f} s"))
    width = max(len(name) for name, _ in rows) if rows else 0
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    by_scenario = Counter(s for s, _, ok in checks.results if not ok)
    if by_scenario:
        print("  failed checks by scenario: " + ", ".join(f"{s}: {n}" for s, n in sorted(by_scenario.items())))
    passed = len(checks.results) - checks.failed
    print(f"\n{passed} of {len(checks.results)} checks passed")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP end the soak like Ctrl-C: through the cleanup, never around it."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _hold_stop_signals() -> None:
    """Once cleanup has begun, a second Ctrl-C must not cut it short and leave a server
    behind: `stop_process_group` has its own deadline and SIGKILL fallback."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def check_leftovers(checks: Checks, session: str) -> None:
    """Every process the soak started carries its marker, even once orphaned; after the
    cleanup none may be left. Any that is gets listed and killed (it is ours)."""
    leftovers = find_leftovers(session, grace_s=10.0)
    checks.scenario = "end"
    checks.check("no process the soak started is still running", not leftovers, f"{len(leftovers)} left")
    for proc in leftovers:
        print(f"      {describe(proc)}")
    kill(leftovers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10, help="kill -9 trials (default 10)")
    parser.add_argument("--rows", type=int, default=600_000, help="records in the CSV (default 600,000)")
    parser.add_argument("--big-mib", type=int, default=2048, help="size of the big regular file in MiB (default 2048)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for kill points and data (default: random)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="which scenarios, e.g. 1,4 (default all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data, SeaweedFS)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    if args.big_mib < 16:
        parser.error("--big-mib must be at least 16 (two multipart parts)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(args.trials, args.rows, args.big_mib, args.seed if args.seed is not None else random.randrange(10**6))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    session = os.environ[SESSION_ENV] = f"soak-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # inherited by all we start
    root = Path(tempfile.mkdtemp(prefix="s3proc-soak-")).resolve()
    print(
        f"soak in {root}: scenarios {args.scenarios}; {cfg.trials} trials, {cfg.rows:,} rows, "
        f"{cfg.big_mib} MiB big file, seed {cfg.seed}"
    )
    started = time.monotonic()
    checks, figures = Checks(), Figures()
    try:
        with ExitStack() as stack:
            if args.keep:
                stack.callback(print, f"kept {root} (logs in {root / 'logs'})")
            else:
                stack.callback(shutil.rmtree, root, ignore_errors=True)
            soak = Soak(root, stack, checks)
            stack.callback(_hold_stop_signals)  # runs first on the way out
            run_scenarios(soak, cfg, figures, args.scenarios.split(","))
    except KeyboardInterrupt as stop:
        interrupted = str(stop) or "SIGINT"
        print(f"\ninterrupted ({interrupted}): everything the soak started has been stopped")
    else:
        interrupted = None
    check_leftovers(checks, session)
    print_summary(checks, figures, cfg)
    print(
        f"total wall time {time.monotonic() - started:.0f} s"
        + (" (interrupted: figures are partial)" if interrupted else "")
    )
    return 130 if interrupted else 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
