"""`s3proc images submit FILE` and `s3proc images status REQUEST_ID [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import dagster as dg

from s3proc_dagster.cli.common import get_instance
from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv
from s3proc_dagster.names import IMAGE_REQUEST_JOB, KIND_TAG, PATH_TAG, REQUEST_ID_TAG, VALIDATE_REQUEST_OP
from s3proc_dagster.settings import load_configuration
from s3proc_dagster.stores import open_store


def _submit(args: argparse.Namespace) -> int:
    from s3proc_dagster.cli.zones import load_zones
    from s3proc_dagster.runs.launch import run_now
    from s3proc_dagster.runs.requests import CONSOLE_LOGGER

    cfg = load_configuration()
    store = open_store(cfg.processing)
    path = Path(args.file)
    watched = tuple(z.watch for z in load_zones(cfg).all() if z.is_directory)  # read below them as the runs do
    try:
        try:
            request = processor.submit_file(
                store, path, max_bytes=cfg.images.csv_max_bytes, max_rows=cfg.images.csv_max_rows, roots=watched
            )
        except InvalidRequestCsv as exc:
            print(f"FAILED  {exc}", file=sys.stderr)
            return 1
        print(request.request_id, flush=True)  # at once, before any image is fetched
        result = run_now(
            get_instance(),
            dg.RunRequest(  # the tags the watch sensor gives a product CSV's run
                job_name=IMAGE_REQUEST_JOB,
                run_config={
                    "ops": {VALIDATE_REQUEST_OP: {"config": {"request_id": request.request_id}}},
                    **CONSOLE_LOGGER,
                },
                tags={
                    PATH_TAG: path.name,
                    KIND_TAG: "image_request",
                    REQUEST_ID_TAG: request.request_id,
                },
            ),
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
            print(json.dumps({**request.to_document(), "rows": [r.to_document() for r in rows]}, indent=2))
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
    images = sub.add_parser(
        "images",
        help="image requests: submit a product CSV whose images are compressed into S3, see its status",
        description=(
            "An image request is a CSV with the columns S. No., Product Name and Input Image Urls "
            "(comma-separated http(s) or s3:// URLs in one cell). Each image is fetched, compressed "
            "(IMAGE_QUALITY) and uploaded to S3, and an output CSV with the output URLs is written beside them."
        ),
    )
    images.set_defaults(help_parser=images)  # `s3proc images` alone prints this parser's help
    isub = images.add_subparsers(dest="images_command", title="commands", metavar="COMMAND")
    submit = isub.add_parser(
        "submit",
        help="validate and record a product CSV, print its requestId, then process it and wait",
        description=(
            "Validate a product CSV (columns, product names, URLs, serial numbers) and record it; print "
            "its requestId at once, then fetch, compress and upload its images in this process and wait. "
            "Exit status 1 when the CSV is invalid (every problem is listed by row) or the run fails."
        ),
    )
    submit.add_argument("file", metavar="CSV", help="the product CSV")
    submit.set_defaults(func=_submit)
    status = isub.add_parser(
        "status",
        help="an image request and its rows: images done per product, output CSV, errors",
    )
    status.add_argument("request_id", metavar="REQUEST_ID", help="the requestId `s3proc images submit` printed")
    status.add_argument(
        "--json",
        action="store_true",
        help=(
            "print JSON with the stored field names (requestId, status, outputCsvUrl, errors, and rows "
            "with serialNumber, productName, inputImageUrls, outputImageUrls, errors)"
        ),
    )
    status.set_defaults(func=_status)
