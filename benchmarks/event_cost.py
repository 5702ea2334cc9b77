"""Benchmark: what one chunk materialization costs in Dagster's event log.

    .venv/bin/python benchmarks/event_cost.py               # SQLite: Dagster's storage and the product's
    .venv/bin/python benchmarks/event_cost.py --postgres    # also PostgreSQL storage (Debian's postgresql)

A one-op job logs N materializations shaped like the pipeline's chunk materializations
(same metadata keys and tag) into a fresh instance, as `parquet_conversion` and
`streaming` do for every chunk; the figure is milliseconds per event. It is the floor
under a big file's upload (one event per chunk) and under a small file's run (tens of
event rows per file), whatever the product does around it.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_job(events: int) -> dg.JobDefinition:
    @dg.op
    def emit(context: dg.OpExecutionContext) -> float:
        started = time.perf_counter()
        for i in range(events):
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=["bench", "events", "promo_csv"],
                    description=f"chunk {i} of bench/promo.csv",
                    metadata={
                        "s3_uri": dg.MetadataValue.url(f"s3://bench/bench/promo.csv/v-0/part-{i:05d}.parquet"),
                        "bytes": 150_000,
                        "sha256": "ab" * 32,
                        "duration_s": 0.05,
                        "fileId": "bench-promo",
                        "reused": False,
                        "chunk_index": i,
                        "rows": 50_000,
                        "start_offset": i * 50_000,
                        "end_offset": i * 50_000 + 49_999,
                        "compression": "ZSTD",
                    },
                    tags={"s3proc/kind": "chunk"},
                )
            )
        return (time.perf_counter() - started) / events * 1000

    @dg.job
    def event_cost() -> None:
        emit()

    return event_cost


def per_event_ms(instance: dg.DagsterInstance, events: int) -> float:
    result = timed_job(events).execute_in_process(instance=instance)
    return result.output_for_node("emit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=413, help="materializations per run (413: the 1 GB CSV)")
    parser.add_argument("--postgres", action="store_true", help="also measure PostgreSQL storage")
    args = parser.parse_args()

    from s3proc_dagster.runs.instance import instance_storage

    rows = []
    with tempfile.TemporaryDirectory() as home:
        rows.append(("SQLite, Dagster's storage", per_event_ms(dg.DagsterInstance.local_temp(home), args.events)))
    with tempfile.TemporaryDirectory() as home:
        storage = {"storage": instance_storage(Path(home) / "storage")}
        (Path(home) / "dagster.yaml").write_text(yaml.safe_dump(storage))
        with dg.DagsterInstance.from_config(home) as instance:
            rows.append(
                ("SQLite, the product's instance (runs/sqlite_storage.py)", per_event_ms(instance, args.events))
            )
    if args.postgres:
        from s3proc_dagster.cli.embedded import start_postgres

        with tempfile.TemporaryDirectory() as logs, tempfile.TemporaryDirectory() as home:
            server = start_postgres(Path(logs))
            try:
                server.create_database("events")
                url = server.database_url("events", "psycopg2")
                (Path(home) / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {url}\n")
                with dg.DagsterInstance.from_config(home) as instance:
                    rows.append(("PostgreSQL 15 (fsync off)", per_event_ms(instance, args.events)))
            finally:
                server.stop()
    print(f"| event log storage | ms per materialization ({args.events} in one op) |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
