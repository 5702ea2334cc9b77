"""Benchmark: the pipeline against raw DuckDB and raw boto3, on the same data, in one run.

    .venv/bin/python benchmarks/run.py                 # 1.5 million promotion records
    .venv/bin/python benchmarks/run.py --size 1GB      # a CSV of about 1 GB
    .venv/bin/python benchmarks/run.py --validate      # with the promotions rule set on

Every measurement runs in its own process, so each gets its own peak RSS (from wait4),
and SeaweedFS is started once and shared, so raw boto3 and the pipeline upload to the
same endpoint. Ratios, not seconds, are the figures to compare across machines.

The baselines: raw DuckDB's `COPY ... TO parquet` (one file, all its threads) for the
conversion; raw boto3 `put_object` of the same chunk files the product sends, on the
same number of threads, for the upload; their sum for the end-to-end time, which the
product beats only by overlapping the two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s3proc_dagster.cli.embedded import start_seaweedfs
from s3proc_dagster.pipeline import UPLOAD_THREADS
from s3proc_dagster.settings import ProcessingConfig

CHUNK_SIZE = ProcessingConfig.model_fields["chunk_size"].default  # what the pipeline runs use

KEY, SECRET, BUCKET = "bench", "bench-secret", "bench"


def parse_size(text: str) -> tuple[int | None, int | None]:
    """'1.5M' rows, '200000' rows, or '1GB' / '500MB' of CSV."""
    t = text.strip().upper()
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20)):
        if t.endswith(unit):
            return None, int(float(t[: -len(unit)]) * factor)
    if t.endswith("M"):
        return int(float(t[:-1]) * 1_000_000), None
    return int(t), None


def generate(path: Path, rows: int | None, target_bytes: int | None) -> int:
    """Promotions shaped like the specification's example file: random ids, codes, dates and amounts.

    Some records are invalid on purpose (blank userId, lower-case code, past expiry), so
    that the validation figures are not measured on clean data only.
    """
    import duckdb

    if rows is None:
        rows = max(1, int(target_bytes / 52))  # about 52 bytes per record
    duckdb.execute(
        f"""
        COPY (
          SELECT
            CASE WHEN i % 997 = 0 THEN '' ELSE 'u-' || substr(md5(i::VARCHAR), 1, 10) END AS userId,
            CASE WHEN i % 1009 = 0 THEN lower(substr(md5((i * 7)::VARCHAR), 1, 8))
                 ELSE upper(substr(md5((i * 7)::VARCHAR), 1, 8)) END AS promoCode,
            (DATE '2027-01-01' + CAST(floor(random() * 700) AS INTEGER)
               - CASE WHEN i % 1013 = 0 THEN 1500 ELSE 0 END) AS offerExpiry,
            round(random() * 500, 2) AS amount
          FROM range({rows}) t(i)
        ) TO '{path}' (HEADER, DELIMITER ',')
        """
    )
    return rows


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MB) of one child process, and its stdout. What the
    previous one left to write back is on disk first: each starts with no writeback of
    another's files competing for the disk (the CSV just generated, the chunk files)."""
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out}\n{err[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024, out


PY = sys.executable

RAW_DUCKDB = """
import duckdb, sys, time
src, dst, comp = sys.argv[1:4]
t = time.perf_counter()
duckdb.execute("SET enable_progress_bar = false")
duckdb.execute(f"COPY (SELECT * FROM read_csv('{src}')) TO '{dst}' (FORMAT parquet, COMPRESSION {comp})")
print(time.perf_counter() - t)
"""

RAW_BOTO3 = """
import boto3, sys, time
from botocore.config import Config
url, key, secret, bucket, path = sys.argv[1:6]
c = boto3.client("s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret,
                 region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
t = time.perf_counter()
c.upload_file(path, bucket, "raw/" + path.rsplit("/", 1)[-1])
print(time.perf_counter() - t)
"""

RAW_BOTO3_CHUNKS = """
import boto3, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from botocore.config import Config
url, key, secret, bucket, folder, threads = sys.argv[1:7]
c = boto3.client("s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret,
                 region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                 max_pool_connections=int(threads)))
parts = sorted(Path(folder).glob("**/part-*.parquet"))  # with validation, the _rejected/ parts too
def put(path):
    with path.open("rb") as body:
        c.put_object(Bucket=bucket, Key="raw-chunks/" + path.relative_to(folder).as_posix(), Body=body)
t = time.perf_counter()
with ThreadPoolExecutor(int(threads)) as pool:
    list(pool.map(put, parts))
print(time.perf_counter() - t, len(parts))
"""

CHUNKS = """
import sys, time
from pathlib import Path
from s3proc_dagster.files.tabular import convert_to_parquet_chunks
from s3proc_dagster.files.validation import as_of_date, rule_set_for
src, out, size, validate = sys.argv[1:5]
rules = rule_set_for("bench/" + Path(src).name) if validate == "1" else None
t = time.perf_counter()
convert_to_parquet_chunks(
    Path(src), "csv", Path(out), int(size), "ZSTD",
    rules=rules.render(as_of_date(None)) if rules else None,
    required_columns=rules.columns if rules else (),
    on_missing_columns=rules.on_missing_columns if rules else "skip_rules",
)
print(time.perf_counter() - t)
"""

STEP_STATS = """
import json, sys
import dagster as dg
inst = dg.DagsterInstance.get()
run = inst.get_run_records(dg.RunsFilter(job_name="process_file_job"), limit=1)[0]
stats = {s.step_key: (s.end_time or 0) - (s.start_time or 0) for s in inst.get_run_step_stats(run.dagster_run.run_id)}
print(json.dumps({"run": run.end_time - run.start_time, "steps": stats}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.5M", help="rows (1.5M, 200000) or bytes of CSV (1GB, 500MB)")
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir, removed after)")
    parser.add_argument("--validate", action="store_true", help="run with the promotions validation rule set")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="s3proc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = start_seaweedfs(work / "seaweedfs", KEY, SECRET, BUCKET)
    try:
        watch = work / "incoming"
        (watch / "bench").mkdir(parents=True, exist_ok=True)
        rows, target = parse_size(args.size)
        name = "promo_batch_bench.csv" if args.validate else "bench_batch.csv"
        big = watch / "bench" / name
        rows = generate(big, rows, target)
        tiny = watch / "bench" / "one_row.csv"
        tiny.write_text("userId,promoCode,offerExpiry,amount\nu-1,ABCD1234,2027-01-01,1.00\n")
        size_mb = big.stat().st_size / 1e6

        raw_convert, raw_convert_rss, out = measure([PY, "-c", RAW_DUCKDB, str(big), str(work / "raw.parquet"), "ZSTD"])
        raw_convert = float(out.strip())
        raw_upload, raw_upload_rss, out = measure(
            [PY, "-c", RAW_BOTO3, server.url, KEY, SECRET, BUCKET, str(work / "raw.parquet")]
        )
        raw_upload = float(out.strip())
        # The upload baseline proper: the same chunk files the product sends, with its threads.
        chunks = work / "chunks"
        _, converter_rss, out = measure(
            [PY, "-c", CHUNKS, str(big), str(chunks), str(CHUNK_SIZE), "1" if args.validate else "0"]
        )
        converter_s = float(out.strip())
        _, _, out = measure(
            [PY, "-c", RAW_BOTO3_CHUNKS, server.url, KEY, SECRET, BUCKET, str(chunks), str(UPLOAD_THREADS)]
        )
        raw_chunks_s, chunk_count = float(out.split()[0]), int(out.split()[1])
        shutil.rmtree(chunks)

        env = {
            "S3_ENDPOINT": server.url,
            "S3_ACCESS_KEY_ID": KEY,
            "S3_SECRET_ACCESS_KEY": SECRET,
            "S3_BUCKET": BUCKET,
            "S3_PREFIX": "pipeline",
            "WATCH_PATH": str(watch),
            "ERROR_DIRECTORY": str(work / "errors"),
            "STAGING_DIRECTORY": str(work / "staging"),
            "PROGRESS_DB_PATH": str(work / "progress.db"),
            "DAGSTER_HOME": str(work / "dagster_home"),
            "MONGODB_URI": "",
            "LOG_LEVEL": "warn",
        }
        if not args.validate:
            env["VALIDATION_RULES_DIR"] = str(work / "no-rules")
        from s3proc_dagster.runs.instance import write_instance

        write_instance(Path(env["DAGSTER_HOME"]), 1)
        s3proc = [PY, "-m", "s3proc_dagster.cli", "process"]
        fixed_wall, fixed_rss, _ = measure([*s3proc, str(tiny)], env)
        _, _, out = measure([PY, "-c", STEP_STATS], env)
        fixed_run = json.loads(out)["run"]
        e2e_wall, e2e_rss, _ = measure([*s3proc, str(big)], env)
        _, _, out = measure([PY, "-c", STEP_STATS], env)
        stats = json.loads(out)
        convert = stats["steps"].get("parquet_conversion", float("nan"))
        upload = stats["steps"].get("streaming", float("nan"))
        e2e_run = stats["run"]

        result = {
            "rows": rows,
            "csv_mb": round(size_mb, 1),
            "raw_duckdb_s": round(raw_convert, 2),
            "raw_duckdb_rss_mb": round(raw_convert_rss),
            "raw_boto3_s": round(raw_upload, 2),
            "raw_boto3_chunks_s": round(raw_chunks_s, 2),
            "chunks": chunk_count,
            "raw_boto3_rss_mb": round(raw_upload_rss),
            "pipeline_convert_s": round(convert, 2),
            "pipeline_upload_s": round(upload, 2),
            "pipeline_run_s": round(e2e_run, 2),
            "pipeline_cli_wall_s": round(e2e_wall, 2),
            "pipeline_rss_mb": round(e2e_rss),
            "fixed_run_s": round(fixed_run, 2),
            "fixed_cli_wall_s": round(fixed_wall, 2),
            "fixed_rss_mb": round(fixed_rss),
            "converter_s": round(converter_s, 2),
            "converter_rss_mb": round(converter_rss),
            "convert_ratio": round(converter_s / raw_convert, 2),
            # chunks land while the conversion goes on: the upload's cost is what it adds to the two steps
            "upload_added_s": round(convert + upload - converter_s, 2),
            "upload_ratio": round((convert + upload - converter_s) / raw_chunks_s, 2),
            "e2e_ratio": round((e2e_run - fixed_run) / (raw_convert + raw_chunks_s), 2),
            "validation": args.validate,
            "pipeline_steps_s": {step: round(seconds, 2) for step, seconds in stats["steps"].items()},
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{rows:,} records, {size_mb:,.0f} MB of CSV{' (validation on)' if args.validate else ''}\n")
            print("| measure | seconds | peak RSS MB | ratio (target) |")
            print("|---|---:|---:|---|")
            print(f"| raw DuckDB COPY to Parquet | {raw_convert:.2f} | {raw_convert_rss:.0f} | 1 |")
            print(f"| raw boto3 upload_file, the one Parquet file | {raw_upload:.2f} | {raw_upload_rss:.0f} | |")
            print(
                f"| raw boto3 put_object, the {chunk_count} chunk files, {UPLOAD_THREADS} threads | {raw_chunks_s:.2f} | | 1 |"
            )
            print(
                f"| the product's converter alone ({chunk_count} chunk files) | {converter_s:.2f} | {converter_rss:.0f} "
                f"| {result['convert_ratio']} (<= 1.1) |"
            )
            print(f"| pipeline conversion step, chunks landing as they close | {convert:.2f} | - | |")
            print(f"| pipeline upload step (the last chunk) | {upload:.2f} | - | |")
            print(
                f"| upload's cost: both steps minus the converter alone | {result['upload_added_s']:.2f} | - "
                f"| {result['upload_ratio']} (<= 1.2) |"
            )
            print(f"| pipeline run, one-row file (fixed cost) | {fixed_run:.2f} | {fixed_rss:.0f} | (<= 3 s) |")
            print(
                f"| pipeline run, big file | {e2e_run:.2f} | {e2e_rss:.0f} | {result['e2e_ratio']} minus fixed, vs raw convert + raw chunks (<= 1.0) |"
            )
            print(f"| `s3proc process` wall, big file | {e2e_wall:.2f} | | includes Python + Dagster start-up |")
        return 0
    finally:
        server.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
