"""`s3proc retry FILE... [--force]`: the manual retry, FAILED -> PENDING, for the watch sensor to run."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from s3proc_dagster.cli.common import FILE_ARGUMENT, back_to_pending
from s3proc_dagster.cli.zones import load_zones
from s3proc_dagster.files import parking
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.sources.names import printable
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR, path_below
from s3proc_dagster.stores import open_store


def _archive_now(path: str, watch: Path, error_dir: Path) -> str:
    """Where an entry's archive is now: parked in the error directory once it failed."""
    archive = Path(path.partition(ENTRY_SEPARATOR)[0])
    if "://" in str(archive) or archive.exists():
        return str(archive)
    with contextlib.suppress(ValueError, OSError):
        parked, _ = parking.parked_location(archive, watch, error_dir)
        if parked.exists():
            return str(parked)
    return str(archive)


def _retry_refusal(status: FileStatus, rel: str | None, force: bool, archive: str = "") -> str | None:
    """Why `retry` will not reset this record, or None. Each refusal is a case where a
    reset would either undo finished work unasked or leave the file PENDING with
    nothing to pick it up (the watch sensor re-runs only files on disk under WATCH_PATH).

    What no option changes comes first (an archive entry, an S3 object, a file outside
    WATCH_PATH), then what the file's state decides: so the advice given is never one a
    second try refuses (`--force` on an entry would only be told to retry the archive).
    """
    path = status.file_path
    if ENTRY_SEPARATOR in path:
        return f"is an entry of an archive: retry the archive, {archive or path.partition(ENTRY_SEPARATOR)[0]}"
    # `process` skips a version already COMPLETED: for one, the advice is `process --force`
    process = "s3proc process --force" if status.status is ProcessingStatus.COMPLETED else "s3proc process"
    if "://" in path:
        return f"came from S3, which the watch sensor does not re-read: run `{process} {path}`"
    if rel is None:
        return f"is not under WATCH_PATH, so the watch sensor would not see it: run `{process} {path}`"
    if status.status is ProcessingStatus.IN_PROGRESS:
        return "is IN_PROGRESS: a run is processing it (if that run died, crash recovery sets it back to PENDING)"
    if status.status is ProcessingStatus.COMPLETED and not force:
        return (
            "is COMPLETED, not FAILED: nothing to retry. To process it again, "
            "`s3proc retry --force` sets it back to PENDING and the watch sensor runs it again"
        )
    return None


def _retry(args: argparse.Namespace) -> int:
    """The manual retry (FAILED -> PENDING in the specification): the original comes back from the error directory, the
    record goes FAILED -> PENDING, and the watch sensor runs it again under a new key.

    Only FAILED files by default, as the help says: a COMPLETED file is reprocessed
    only with --force, so a mistyped path cannot redo finished work.
    """
    zones = load_zones()
    store = open_store(zones.default.cfg.processing)
    refused = 0
    try:
        files = store.list_files()
        for raw in args.paths:
            ref = zones.file_ref(raw, Path.cwd())
            matched = [f for f in files if ref.matches(f)]
            if not matched:
                print(f"s3proc: no file matches {raw}", file=sys.stderr)
                refused += 1
            for status in matched:
                if status.status is ProcessingStatus.PENDING:
                    print(printable(f"PENDING    {status.file_path}  (already; the watch sensor will run it)"))
                    continue
                zone = zones.of_record(status)  # its own source and error folder, a declared zone's or the default's
                watch, error_dir = zone.watch, zone.error_dir
                path = Path(status.file_path)
                rel = path_below(path, watch) if "://" not in status.file_path else None
                archive = (
                    _archive_now(status.file_path, watch, error_dir) if ENTRY_SEPARATOR in status.file_path else ""
                )
                problem = _retry_refusal(status, rel, args.force, archive)
                parked, _ = parking.parked_location(path, watch, error_dir)
                if problem is None and not path.exists() and not parked.exists():
                    problem = f"is neither in WATCH_PATH nor in the error directory ({parked}) any more"
                if problem:
                    print(printable(f"s3proc: {status.file_path}: {problem}"), file=sys.stderr)
                    refused += 1
                    continue
                was = status.status.name
                back_to_pending(store, status, watch, error_dir)
                print(printable(f"PENDING    {path}  (was {was}; the watch sensor will run it again)"))
    finally:
        store.close()
    return 1 if refused else 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "retry",
        help="set a FAILED file back to PENDING so the watch sensor processes it again",
        description=(
            "Set a FAILED file back to PENDING, moving it back from the error directory (ERROR_DIRECTORY) "
            "to where it was under WATCH_PATH, so the watch sensor processes it again; `s3proc dev` or a "
            "Dagster daemon must be running for that. A declared landing zone's file comes back from "
            "ERROR_DIRECTORY/<zone> to its zone's source, for the zone's sensor. An IN_PROGRESS file, a COMPLETED one (unless --force) "
            "and one the watch sensor cannot pick up (an archive entry, an S3 object, a file outside "
            "WATCH_PATH) are left alone, with the reason and what to do instead (exit status 1)."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="FILE", help=f"the file to retry: {FILE_ARGUMENT}")
    parser.add_argument(
        "--force",
        action="store_true",
        help=(
            "also reprocess a COMPLETED file: set it back to PENDING so the watch sensor processes it again "
            "(every step runs again; chunks already in S3 and verified are not uploaded again)"
        ),
    )
    parser.set_defaults(func=_retry)
