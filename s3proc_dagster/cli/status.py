"""`s3proc status [PATH] [--chunks] [--json]`: what the progress store recorded, and with
PATH the runs of that file from the Dagster instance, read without writing one."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from s3proc_dagster.cli.common import FILE_ARGUMENT, dagster_home
from s3proc_dagster.cli.zones import Zone, Zones, load_zones
from s3proc_dagster.files import parking
from s3proc_dagster.models import ChunkStatus, FileStatus, ProcessingStatus
from s3proc_dagster.sources.names import printable
from s3proc_dagster.stores import open_store


def _table(headers: list[str], rows: list[list[str]], right: set[int], indent: str = "    ") -> list[str]:
    """Columns as wide as their widest cell; numbers right-aligned so digits line up."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _chunk_lines(chunks: list[ChunkStatus]) -> list[str]:
    """A file's chunks as the table `status --chunks` prints under it: which records each
    holds, where it landed, and why it failed, without reaching for --json."""
    if not chunks:
        return ["    (no chunks: not converted yet, or not a tabular file)"]
    rows = [
        [
            str(c.chunk_index),
            c.status.name,
            str(c.record_count),
            f"{c.start_offset}-{c.end_offset}",
            "-" if c.size_bytes is None else str(c.size_bytes),
            str(c.retry_count),
            c.s3_key or "-",
            c.error_details or "",
        ]
        for c in chunks
    ]
    headers = ["index", "status", "records", "offsets", "bytes", "retries", "S3 key", "error"]
    return _table(headers, rows, right={0, 2, 4, 5})


def _started(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _file_runs(files: list[FileStatus], zones: Zones) -> tuple[dict[str, list[dict[str, Any]]] | None, str]:
    """Each file's runs, newest first, found by the tag every run of a file carries, its
    own or a batch's (`runs.tags.recorded_file_tag`); or None and why they cannot be listed.

    Read-only: unlike `get_instance`, no instance is written where there is none, and an
    instance that does not open (its PostgreSQL down) costs the listing, not the command."""
    import dagster as dg

    from s3proc_dagster.runs.tags import recorded_file_tag

    home = dagster_home()
    if not ((home / "dagster.yaml").is_file() or (home / "storage").is_dir()):
        return None, f"no Dagster instance at {home} (DAGSTER_HOME), so its runs are not listed"
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for f in files:
                zone = zones.of_record(f)  # its runs' relative path is below its zone's source
                tag = recorded_file_tag(f, zone.watch, zone.error_dir, zone.incoming_prefix)
                found[f.file_id] = [
                    {
                        "runId": r.dagster_run.run_id,
                        "job": r.dagster_run.job_name,
                        "status": r.dagster_run.status.value,
                        "startTime": _started(r.start_time),
                        # a batch run succeeds for its other files when it gives one up
                        "gaveUpThisFile": f.status == ProcessingStatus.FAILED and f.run_id == r.dagster_run.run_id,
                    }
                    for r in instance.get_run_records(dg.RunsFilter(tags=tag))
                ]
    except Exception as exc:  # whatever the storage raises, the records above are still worth showing
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        return (
            None,
            f"the Dagster instance at {home} did not open ({type(exc).__name__}: {reason}), so runs are not listed",
        )
    return found, ""


def _run_lines(runs: list[dict[str, Any]] | None, no_runs: str, ui_filter: str) -> list[str]:
    """The file's runs, and the tag that finds them in the UI's Runs page."""
    find = f"in the UI's Runs page, filter by the tag {ui_filter}"
    if runs is None:
        return [f"    runs: {no_runs}", f"    ({find})"]
    if not runs:
        return [f"    runs: none on the Dagster instance ({find})"]
    rows = [
        [
            r["runId"][:8],
            r["job"],
            r["status"] + (", gave this file up" if r["gaveUpThisFile"] else ""),
            r["startTime"] or "-",
        ]
        for r in runs
    ]
    return [f"    runs, newest first ({find}):", *_table(["run", "job", "status", "started (UTC)"], rows, right=set())]


def _ui_filter(f: FileStatus, zone: Zone) -> str:
    """What to type in the UI's runs filter to find every run of the file: `key=value`."""
    from s3proc_dagster.runs.tags import recorded_file_tag

    ((key, value),) = recorded_file_tag(f, zone.watch, zone.error_dir, zone.incoming_prefix).items()
    return f"{key}={value}"


def _status(args: argparse.Namespace) -> int:
    """Each record is shown by its own zone's settings: a FAILED zone file waits in
    ERROR_DIRECTORY/<zone>, and its zone is named, so the user knows whose rules ran it."""
    zones = load_zones()
    store = open_store(zones.default.cfg.processing)
    try:
        files = store.list_files()
        recorded = bool(files)
        if args.path:
            ref = zones.file_ref(args.path, Path.cwd())
            files = [f for f in files if ref.matches(f)]
        chunks = {f.file_id: store.list_chunks(f.file_id) for f in files} if args.chunks else {}
    finally:
        store.close()
    zone_of = {f.file_id: zones.of_record(f) for f in files}
    parked = {f.file_id: parking.parked_path(f, zone_of[f.file_id].watch, zone_of[f.file_id].error_dir) for f in files}
    runs, no_runs = _file_runs(files, zones) if args.path and files else ({}, "")
    shown = _Shown(files, zone_of, parked, chunks, runs, no_runs)
    if args.json:
        _print_json(args, shown)
    else:
        if not recorded and not args.path:
            print("no files recorded yet")
        _print_text(args, shown)
    if args.path and not files:
        empty = "" if recorded else " (no files recorded yet)"
        print(f"s3proc: no file matches {args.path}{empty}", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True)
class _Shown:
    """What `status` found, for either of its two outputs."""

    files: list[FileStatus]
    zone_of: dict[str, Zone]
    parked: dict[str, str | None]
    chunks: dict[str, list[ChunkStatus]]
    runs: dict[str, list[dict[str, Any]]] | None
    no_runs: str


def _print_json(args: argparse.Namespace, shown: _Shown) -> None:
    out = []
    for f in shown.files:
        doc = f.to_document()
        doc["parkedPath"] = shown.parked[f.file_id]
        if zone := shown.zone_of[f.file_id].name:  # the default zone's files keep the document as it was
            doc["zone"] = zone
        if args.chunks:
            doc["chunks"] = [c.to_document() for c in shown.chunks[f.file_id]]
        if args.path:
            doc["runs"] = None if shown.runs is None else shown.runs.get(f.file_id, [])
        out.append(doc)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if shown.no_runs:
        print(f"s3proc: {shown.no_runs}", file=sys.stderr)


def _print_text(args: argparse.Namespace, shown: _Shown) -> None:
    for f in shown.files:
        stats, parked = f.processing_stats, shown.parked[f.file_id]
        # where the file is now; an output only once there is one (COMPLETED)
        where = (parked or f.file_path) + shown.zone_of[f.file_id].marker
        output = f"  ->  {f.output_key}" if f.status is ProcessingStatus.COMPLETED and f.output_key else ""
        moved = f"  (parked in the error directory; read from {f.file_path})" if parked else ""
        line = f"{f.status.name:<11} {stats.completed_chunks:>4}/{f.total_chunks:<4} chunks  {where}{output}{moved}"
        print(printable(line + (f"  error: {f.error_details}" if f.error_details else "")))
        if args.chunks:
            print("\n".join(_chunk_lines(shown.chunks[f.file_id])))
        if args.path:
            runs = None if shown.runs is None else shown.runs[f.file_id]
            for line in _run_lines(runs, shown.no_runs, _ui_filter(f, shown.zone_of[f.file_id])):
                print(printable(line))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "status",
        help="every recorded file with its status, chunks, output and error",
        description=(
            "Every file in the progress store (PROGRESS_DB_PATH or MONGODB_URI) with its status, "
            "chunks done/total, where it is now (a FAILED file is parked in the error directory), where "
            "its output was written (COMPLETED files only) and the error if it failed; a declared landing "
            "zone's file is marked [zone NAME] and parked in ERROR_DIRECTORY/NAME. With PATH, also "
            "the runs that processed the file, its own and batch runs, from the Dagster instance at "
            "DAGSTER_HOME (default ./.dagster_home). Exit status 1 when PATH is given and no file matches it."
        ),
    )
    parser.add_argument("path", nargs="?", metavar="PATH", help=f"show only this file: {FILE_ARGUMENT}")
    parser.add_argument(
        "--json",
        action="store_true",
        help=(
            "print a JSON list with the stored field names (fileId, filePath, status, outputKey, "
            "s3Bucket/s3Key of a source object in S3, processingStats, errorSummary, errorDetails ...), "
            "plus parkedPath (where a FAILED file waits in the error directory now, else null), zone "
            "(the landing zone of a declared zone's file; absent for the default zone's) and, "
            'with PATH, "runs" (runId, job, status, startTime, gaveUpThisFile of each run that processed it)'
        ),
    )
    parser.add_argument(
        "--chunks",
        action="store_true",
        help=(
            "also show each file's chunks: a table (index, status, records, offsets, bytes, retries, "
            'S3 key, error), or with --json a "chunks" list in each file'
        ),
    )
    parser.set_defaults(func=_status)
