"""`s3proc process FILE...`: each file's run now, in this process, as the sensors would request it."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from s3proc_dagster.cli.common import get_instance, request_for
from s3proc_dagster.cli.zones import Zones, load_zones
from s3proc_dagster.files.globs import admitted
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.names import IMAGE_REQUEST_JOB, PATH_TAG, REQUEST_ID_TAG, SOURCE_TAG
from s3proc_dagster.stores import open_store
from s3proc_dagster.stores.base import ProgressStore

if TYPE_CHECKING:
    from dagster import DagsterRun


def _process(args: argparse.Namespace) -> int:
    """Each file's run, then one outcome line per file on stdout; the product's progress
    lines go to stderr as it works (LOG_LEVEL, LOG_PRETTY), Dagster's own only at debug.
    A declared landing zone's file runs with its zone's settings, as its zone's sensor
    would run it. With --force a COMPLETED file is set back to PENDING first, as `retry
    --force` does for a file the watch sensor sees: its run would otherwise find the same
    version COMPLETED and skip it, and a file read from outside WATCH_PATH or from S3 has
    no other way to be processed again."""
    from s3proc_dagster.runs.launch import run_now

    zones = load_zones()
    instance = get_instance()
    store = open_store(zones.default.cfg.processing)
    failed = 0
    try:
        for raw in args.paths:
            request = request_for(raw, zones)
            left_out = _left_out(zones, raw, request.tags.get(PATH_TAG, ""))
            if left_out:
                print(f"s3proc: {raw}: {left_out}; nothing run", file=sys.stderr)
                failed += 1
                continue
            done = store.get_by_path(request.tags[SOURCE_TAG]) if args.force else None
            if done is not None and done.status is ProcessingStatus.COMPLETED:
                store.reset_to_pending(done.file_id)
            outcome = run_now(instance, request)
            failed += not outcome.success
            if request.job_name == IMAGE_REQUEST_JOB:  # a product CSV: its request's outcome, it has no file record
                told = _request_outcome(store, instance.get_run_by_id(outcome.run_id), outcome.success)
            else:
                told = _outcome(store.get_by_path(request.tags[SOURCE_TAG]), outcome.run_id, outcome.success)
            print(f"{told}  {raw}  (run {outcome.run_id[:8]})")
    finally:
        store.close()
    return 1 if failed else 0


def _left_out(zones: Zones, raw: str, relative_path: str) -> str | None:
    """Why a declared zone's sensor would pass this file over (its include and exclude
    globs), or None: `process` runs a zone's file as its sensor would, so not this one."""
    zone = zones.of_argument(raw)
    cfg = zone.cfg.zone
    if zone.declared is None or not relative_path or admitted(relative_path, cfg.include, cfg.exclude):
        return None
    return (
        f"zone {zone.name!r} leaves {relative_path} out (include {list(cfg.include)}, exclude {list(cfg.exclude)}), "
        "so its sensor never runs it"
    )


def _outcome(status: FileStatus | None, run_id: str, success: bool) -> str:
    """What this run did to the file: its own result, or why it left the file alone."""
    if status is None:
        return "FAILED" if not success else "SKIPPED"
    if status.run_id != run_id and success:  # another run holds it, or it was already done
        if status.status is ProcessingStatus.IN_PROGRESS:
            return f"SKIPPED: held by run {(status.run_id or '')[:8]}"
        again = "; `s3proc process --force` processes it again" if status.status is ProcessingStatus.COMPLETED else ""
        return f"SKIPPED: unchanged since run {(status.run_id or '')[:8]} ({status.status.name}){again}"
    if status.status is ProcessingStatus.COMPLETED:
        return f"COMPLETED -> {status.output_key}"
    if status.status is ProcessingStatus.FAILED:
        return f"FAILED: {status.error_details}"
    return status.status.name


def _request_outcome(store: ProgressStore, run: DagsterRun | None, success: bool) -> str:
    """An image request's status, its output CSV or its first problems (`s3proc images status` has them all)."""
    request = store.get_request(run.tags.get(REQUEST_ID_TAG, "")) if run is not None else None
    if request is None:
        return "FAILED" if not success else "SKIPPED"
    head = f"{request.status.value.upper()}: image request {request.request_id}"
    if request.errors:
        return f"{head}: {'; '.join(request.errors[:3])}"
    return f"{head} -> {request.output_csv_url or ''}"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "process",
        help="process files now, in this process, and wait for each",
        description=(
            "Run process_file_job for each file now, in this process, on the Dagster instance at "
            "DAGSTER_HOME (default ./.dagster_home), and wait for it. The runs show in the Dagster UI "
            "with the same tags as the watch sensor's. A file already COMPLETED in this version is skipped "
            "unless --force. Exit status 1 when any run fails."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="FILE",
        help=(
            "an s3:// URI, or a local file: below WATCH_PATH (or a landing zone's source, whose settings "
            "its run then takes) it is opened without following any link; anywhere else it is read as you "
            "name it (known by its name alone), but never through a link as its last component"
        ),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=(
            "also process a COMPLETED file whose content has not changed: set it back to PENDING first "
            "(every step runs again; chunks already in S3 and verified are not uploaded again)"
        ),
    )
    parser.set_defaults(func=_process)
