"""`s3proc images submit FILE` and `s3proc images status REQUEST_ID [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dagster as dg

from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv
from s3proc_dagster.settings import load_configuration
from s3proc_dagster.stores import open_store


def image_request_job_with_resources() -> dg.JobDefinition:
    """Module-level so that `dg.reconstructable` can rebuild the job in a run worker."""
    from s3proc_dagster.definitions import defs

    return defs.resolve_job_def("image_request_job")


def _submit(args: argparse.Namespace) -> int:
    from s3proc_dagster.defs.runs import get_instance

    cfg = load_configuration()
    store = open_store(cfg.processing)
    path = Path(args.file)
    try:
        try:
            request = processor.submit(store, path.read_bytes(), path.name)
        except InvalidRequestCsv as exc:
            print(f"FAILED  {exc}", file=sys.stderr)
            return 1
        print(request.request_id, flush=True)  # at once, before any image is fetched
        result = dg.execute_job(
            dg.reconstructable(image_request_job_with_resources),
            instance=get_instance(),
            run_config={"ops": {"validate_request": {"config": {"request_id": request.request_id}}}},
            tags={"s3proc/request_id": request.request_id, "s3proc/path": path.name},
        )
        final = store.require_request(request.request_id)
        print(f"{final.status.value.upper():<10} {final.output_csv_url or ''}")
        return 0 if result.success else 1
    finally:
        store.close()


def _status(args: argparse.Namespace) -> int:
    cfg = load_configuration()
    store = open_store(cfg.processing)
    try:
        request = store.require_request(args.request_id)
        rows = store.list_request_rows(args.request_id)
        if args.json:
            print(json.dumps({**request.to_seed(), "rows": [r.to_seed() for r in rows]}, indent=2))
            return 0
        print(f"{request.request_id}  {request.status.value}  {request.output_csv_url or ''}")
        for problem in request.errors:
            print(f"  ! {problem}")
        for row in rows:
            done = sum(1 for u in row.output_image_urls if u)
            print(f"  {row.serial_number:>4}  {row.product_name:<30} {done}/{len(row.input_image_urls)} images")
        return 0
    finally:
        store.close()


def register(sub: argparse._SubParsersAction) -> None:
    images = sub.add_parser("images", help="seed 002 image requests: submit a product CSV, see its status")
    isub = images.add_subparsers(dest="images_command", required=True)
    submit = isub.add_parser("submit", help="validate and record a product CSV, print its requestId, process it")
    submit.add_argument("file")
    submit.set_defaults(func=_submit)
    status = isub.add_parser("status", help="a request and its rows")
    status.add_argument("request_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
