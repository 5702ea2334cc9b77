"""How far one asset key per file goes on the project's SQLite instance storage.

    .venv/bin/python benchmarks/asset_catalog.py --files 20000 --chunks 3

Records, in a temporary DAGSTER_HOME, one materialization per chunk and one per file
for N distinct file asset keys (what N processed files leave behind), then times what
the UI's catalog does: list the asset keys and read each one's latest materialization.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

from s3proc_dagster.runs.instance import instance_storage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000, help="distinct file asset keys (default 20000)")
    parser.add_argument(
        "--chunks", type=int, default=3, help="chunk materializations per file, besides its own (default 3)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["DAGSTER_HOME"] = home
        # the project's SQLite instance storage (`runs.instance.instance_storage`)
        storage = instance_storage(Path(home) / "storage")
        Path(home, "dagster.yaml").write_text(yaml.safe_dump({"storage": storage, "telemetry": {"enabled": False}}))
        instance = dg.DagsterInstance.get()
        started = time.perf_counter()
        for i in range(args.files):
            key = dg.AssetKey(["deploy", f"folder{i % 100}", f"file_{i:06d}_csv"])
            for c in range(args.chunks + 1):
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=key, metadata={"chunk_index": c, "rows": 50000})
                )
            if (i + 1) % 1000 == 0:
                rate = (i + 1) * (args.chunks + 1) / (time.perf_counter() - started)
                print(f"  {i + 1:,} files: {rate:,.0f} events/s so far", flush=True)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        keys = instance.get_asset_keys()
        list_s = time.perf_counter() - started
        started = time.perf_counter()
        latest = instance.get_latest_materialization_events(keys[:1000])
        assert len(latest) == min(1000, len(keys))
        latest_s = time.perf_counter() - started
        events = args.files * (args.chunks + 1)
        print(
            f"{args.files:,} file assets, {events:,} materializations: "
            f"{events / write_s:,.0f} events/s written, {len(keys):,} keys listed in {list_s:.2f} s, "
            f"latest of 1,000 keys in {latest_s:.2f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
