"""The `s3proc` command: status, read, process, retry, backfill, images, and `dev`.

Every help text has to stand alone: the user reading `s3proc retry --help` has neither
the README nor the specification in front of them. File arguments mean what
`sources.paths.resolve_user_path` says, the same for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dotenv import load_dotenv

from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.files import parking
from s3proc_dagster.logs import configure_logging
from s3proc_dagster.models import ChunkStatus, FileStatus, ProcessingStatus
from s3proc_dagster.names import BACKFILL_TAG, SOURCE_TAG
from s3proc_dagster.settings import Configuration, LoggingConfig, load_configuration
from s3proc_dagster.sources.paths import (
    ENTRY_SEPARATOR,
    path_below,
    relative_to_watch,
    resolve_user_path,
)
from s3proc_dagster.stores import open_store

if TYPE_CHECKING:
    import dagster as dg


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


def _status(args: argparse.Namespace) -> int:
    cfg = load_configuration()
    store = open_store(cfg.processing)
    try:
        files = store.list_files()
        recorded = bool(files)
        if args.path:
            ref = resolve_user_path(args.path, cfg.monitoring.watch_path, Path.cwd(), cfg.processing.error_directory)
            files = [f for f in files if ref.matches(f)]
        chunks = {f.file_id: store.list_chunks(f.file_id) for f in files} if args.chunks else {}
    finally:
        store.close()
    if args.json:
        out = []
        for f in files:
            doc = f.to_document()
            if args.chunks:
                doc["chunks"] = [c.to_document() for c in chunks[f.file_id]]
            out.append(doc)
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if not recorded and not args.path:
            print("no files recorded yet")
        for f in files:
            stats = f.processing_stats
            print(
                f"{f.status.name:<11} {stats.completed_chunks:>4}/{f.total_chunks:<4} chunks  "
                f"{f.file_path}  ->  {f.output_key or '-'}" + (f"  error: {f.error_details}" if f.error_details else "")
            )
            if args.chunks:
                print("\n".join(_chunk_lines(chunks[f.file_id])))
    if args.path and not files:
        empty = "" if recorded else " (no files recorded yet)"
        print(f"s3proc: no file matches {args.path}{empty}", file=sys.stderr)
        return 1
    return 0


def get_instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME; without one, the checkout's `.dagster_home` (written
    as `scripts/dev` writes it), so the runs show in the same UI."""
    import dagster as dg

    from s3proc_dagster.cli.dev import write_instance

    if not os.environ.get("DAGSTER_HOME"):
        home = Path.cwd() / ".dagster_home"
        if not (home / "dagster.yaml").exists():
            write_instance(home, int(os.environ.get("MAX_CONCURRENCY", "4")))
        os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def request_for(raw: str, cfg: Configuration) -> dg.RunRequest:
    """The RunRequest the watch or S3 sensor would make for this file: same config, same
    tags (the file's metadata, `dagster/priority`), so a run started here is one of theirs.

    The file is located by the run's own rule (`sources.resolve.locate`: a link is never
    resolved). A name the run will refuse, or an object whose metadata cannot be read,
    still gets its run, which records the file FAILED with the reason."""
    from s3proc_dagster.errors import UnsafeSourceError
    from s3proc_dagster.runs.requests import run_request_for
    from s3proc_dagster.sources.resolve import locate
    from s3proc_dagster.sources.s3_incoming import metadata_from_object

    try:
        source = locate(raw, cfg.monitoring.watch_path, cfg.s3.incoming_prefix)
    except UnsafeSourceError:
        return run_request_for(raw if "://" in raw else os.path.abspath(raw), "", run_key="", metadata={})
    metadata = None
    if source.is_object:
        from s3proc_dagster.transfer.client import client_for
        from s3proc_dagster.transfer.verify import head

        try:
            found = head(client_for(cfg.s3), source.bucket or "", source.key or "") or {}
        except S3ProcError:
            found = {}
        metadata = metadata_from_object(found.get("Metadata", {}))
    return run_request_for(source.uri, source.relative_path, run_key="", metadata=metadata, roots=source.roots)


def _process(args: argparse.Namespace) -> int:
    """Each file's run, then one outcome line per file on stdout; the product's progress
    lines go to stderr as it works (LOG_LEVEL, LOG_PRETTY), Dagster's own only at debug."""
    from s3proc_dagster.runs.launch import run_now

    cfg = load_configuration()
    instance = get_instance()
    store = open_store(cfg.processing)
    failed = 0
    try:
        for raw in args.paths:
            request = request_for(raw, cfg)
            outcome = run_now(instance, request)
            status = store.get_by_path(request.tags[SOURCE_TAG])
            failed += not outcome.success
            print(f"{_outcome(status, outcome.run_id, outcome.success)}  {raw}  (run {outcome.run_id[:8]})")
    finally:
        store.close()
    return 1 if failed else 0


def _outcome(status: FileStatus | None, run_id: str, success: bool) -> str:
    """What this run did to the file: its own result, or why it left the file alone."""
    if status is None:
        return "FAILED" if not success else "SKIPPED"
    if status.run_id != run_id and success:  # another run holds it, or it was already done
        if status.status is ProcessingStatus.IN_PROGRESS:
            return f"SKIPPED: held by run {(status.run_id or '')[:8]}"
        return f"SKIPPED: unchanged since run {(status.run_id or '')[:8]} ({status.status.name})"
    if status.status is ProcessingStatus.COMPLETED:
        return f"COMPLETED -> {status.output_key}"
    if status.status is ProcessingStatus.FAILED:
        return f"FAILED: {status.error_details}"
    return status.status.name


def _retry_refusal(status: FileStatus, rel: str | None, force: bool) -> str | None:
    """Why `retry` will not reset this record, or None. Each refusal is a case where a
    reset would either undo finished work unasked or leave the file PENDING with
    nothing to pick it up (the watch sensor re-runs only files on disk under WATCH_PATH)."""
    path = status.file_path
    if status.status is ProcessingStatus.IN_PROGRESS:
        return "is IN_PROGRESS: a run is processing it (if that run died, crash recovery sets it back to PENDING)"
    if status.status is ProcessingStatus.COMPLETED and not force:
        return (
            "is COMPLETED, not FAILED: nothing to retry. To process it again, "
            "`s3proc retry --force` sets it back to PENDING and the watch sensor runs it again"
        )
    if ENTRY_SEPARATOR in path:
        return f"is an entry of an archive: retry the archive, {path.partition(ENTRY_SEPARATOR)[0]}"
    if "://" in path:
        return f"came from S3, which the watch sensor does not re-read: run `s3proc process {path}`"
    if rel is None:
        return f"is not under WATCH_PATH, so the watch sensor would not see it: run `s3proc process {path}`"
    return None


def _retry(args: argparse.Namespace) -> int:
    """The manual retry (FAILED -> PENDING in the specification): the original comes back from the error directory, the
    record goes FAILED -> PENDING, and the watch sensor runs it again under a new key.

    Only FAILED files by default, as the help says: a COMPLETED file is reprocessed
    only with --force, so a mistyped path cannot redo finished work.
    """
    cfg = load_configuration()
    watch, error_dir = cfg.monitoring.watch_path, cfg.processing.error_directory
    store = open_store(cfg.processing)
    refused = 0
    try:
        files = store.list_files()
        for raw in args.paths:
            ref = resolve_user_path(raw, watch, Path.cwd(), error_dir)
            matched = [f for f in files if ref.matches(f)]
            if not matched:
                print(f"s3proc: no file matches {raw}", file=sys.stderr)
                refused += 1
            for status in matched:
                if status.status is ProcessingStatus.PENDING:
                    print(f"PENDING    {status.file_path}  (already; the watch sensor will run it)")
                    continue
                path = Path(status.file_path)
                rel = path_below(path, watch) if "://" not in status.file_path else None
                problem = _retry_refusal(status, rel, args.force)
                parked, _ = parking.parked_location(path, watch, error_dir)
                if problem is None and not path.exists() and not parked.exists():
                    problem = f"is neither in WATCH_PATH nor in the error directory ({parked}) any more"
                if problem:
                    print(f"s3proc: {status.file_path}: {problem}", file=sys.stderr)
                    refused += 1
                    continue
                if not path.exists():
                    parking.unpark(path, watch, error_dir)
                was = status.status.name
                store.reset_to_pending(status.file_id, None)
                print(f"PENDING    {path}  (was {was}; the watch sensor will run it again)")
    finally:
        store.close()
    return 1 if refused else 0


def select_backfill(cfg, store, since: str | None, status: str | None, pattern: str | None) -> list[Path]:
    """Files under WATCH_PATH matching every given filter (glob, mtime since, store status)."""
    from datetime import datetime

    from s3proc_dagster.files.globs import path_matches
    from s3proc_dagster.sources.watch import scan

    root = cfg.monitoring.watch_path
    files = scan(root, skip_dirs=(cfg.processing.error_directory, cfg.processing.staging_directory))
    if status:
        wanted = {f.file_path for f in store.list_files(ProcessingStatus.parse(status))}
        files = [f for f in files if str(f.path) in wanted]
    if pattern:
        files = [f for f in files if path_matches(f.relative_path, pattern)]
    if since:
        cutoff = datetime.fromisoformat(since).timestamp() * 1e9
        files = [f for f in files if f.mtime_ns >= cutoff]
    return [f.path for f in sorted(files, key=lambda f: f.relative_path)]


def _backfill(args: argparse.Namespace) -> int:
    """One queued run per matching file, through a running Dagster webserver's run queue."""
    from urllib.parse import urlparse

    from dagster_graphql import DagsterGraphQLClient

    from s3proc_dagster.runs.requests import run_request_for

    cfg = load_configuration()
    store = open_store(cfg.processing)
    try:
        paths = select_backfill(cfg, store, args.since, args.status, args.glob)
    finally:
        store.close()
    url = urlparse(args.url)
    client = DagsterGraphQLClient(url.hostname or "127.0.0.1", port_number=url.port, use_https=url.scheme == "https")
    for path in paths:
        request = run_request_for(str(path), relative_to_watch(path, cfg.monitoring.watch_path), run_key="")
        tags = {**request.tags, BACKFILL_TAG: "true"}
        if args.dry_run:
            print(f"would queue  {path}")
            continue
        run_id = client.submit_job_execution(request.job_name, run_config=request.run_config, tags=tags)
        print(f"queued {run_id[:8]}  {path}")
    print(f"{len(paths)} file(s) {'selected' if args.dry_run else 'queued'}")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from s3proc_dagster.cli.dev import run_dev

    return run_dev(host=args.host, port=args.port)


EXAMPLES = """\
examples:
  s3proc status                                 every file: status, chunks done/total, output, error
  s3proc status nyc/flights.csv --chunks        one file (path as in run tags) and its chunks
  s3proc status --json                          the same as JSON, for scripts
  s3proc read nyc/flights.csv --limit 10        a file's records back from S3, as CSV
  s3proc process data/incoming/promo.csv        process a file now and wait
  s3proc backfill --status failed --dry-run     list the files a backfill would queue
  s3proc retry data/errors/promo.csv            reprocess a FAILED file
  s3proc dev --port 3001                        run everything locally, Dagster UI on port 3001

Settings come from the environment or from .env in the current directory (see .env.example).
"""

FILE_ARGUMENT = (
    "a path (absolute, relative to the current directory, or relative to WATCH_PATH as run tags "
    "show it), a path in the error directory, an s3:// URI, <archive>!/<entry path> for a file "
    "inside an archive, or a fileId"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3proc",
        description=(
            "Files from a watched directory (WATCH_PATH) or an S3 prefix to Parquet in S3, tracked in a\n"
            "progress store: see what was processed, read it back, process or retry files, start a local\n"
            "deployment."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    status = sub.add_parser(
        "status",
        help="every recorded file with its status, chunks, output and error",
        description=(
            "Every file in the progress store (PROGRESS_DB_PATH or MONGODB_URI) with its status, "
            "chunks done/total, where its output was written and the error if it failed. "
            "Exit status 1 when PATH is given and no file matches it."
        ),
    )
    status.add_argument("path", nargs="?", metavar="PATH", help=f"show only this file: {FILE_ARGUMENT}")
    status.add_argument(
        "--json",
        action="store_true",
        help=(
            "print a JSON list with the stored field names (fileId, filePath, status, outputKey, "
            "s3Bucket/s3Key of a source object in S3, processingStats, errorSummary, errorDetails ...)"
        ),
    )
    status.add_argument(
        "--chunks",
        action="store_true",
        help=(
            "also show each file's chunks: a table (index, status, records, offsets, bytes, retries, "
            'S3 key, error), or with --json a "chunks" list in each file'
        ),
    )
    status.set_defaults(func=_status)

    from s3proc_dagster.cli.read import register as register_read

    register_read(sub)

    process = sub.add_parser(
        "process",
        help="process files now, in this process, and wait for each",
        description=(
            "Run process_file_job for each file now, in this process, on the Dagster instance at "
            "DAGSTER_HOME (default ./.dagster_home), and wait for it. The runs show in the Dagster UI "
            "with the same tags as the watch sensor's. Exit status 1 when any run fails."
        ),
    )
    process.add_argument(
        "paths",
        nargs="+",
        metavar="FILE",
        help=(
            "an s3:// URI, or a local file: below WATCH_PATH it is opened without following any link; "
            "anywhere else it is read as you name it (known by its name alone), but never through a link "
            "as its last component"
        ),
    )
    process.set_defaults(func=_process)

    backfill = sub.add_parser(
        "backfill",
        help="queue one run per matching file under WATCH_PATH, through the Dagster webserver",
        description=(
            "Queue one process_file_job run per file under WATCH_PATH that matches every filter "
            "given, through a running Dagster webserver (`s3proc dev` or scripts/dev runs one); "
            "the instance's run queue then runs them, at most MAX_CONCURRENCY at once."
        ),
    )
    backfill.add_argument(
        "--glob", help="path pattern relative to WATCH_PATH, ** for any folders, e.g. 'march2024/**/*.csv'"
    )
    backfill.add_argument(
        "--since", help="only files modified at or after this ISO date or time, e.g. 2026-11-01 or 2026-11-01T08:00"
    )
    backfill.add_argument(
        "--status",
        choices=["pending", "in_progress", "completed", "failed"],
        help="only files whose recorded status is this",
    )
    backfill.add_argument(
        "--url",
        default="http://127.0.0.1:3000",
        help="the Dagster webserver to queue the runs on (default: %(default)s, where scripts/dev serves it)",
    )
    backfill.add_argument("--dry-run", action="store_true", help="list the files that would be queued; queue nothing")
    backfill.set_defaults(func=_backfill)

    retry = sub.add_parser(
        "retry",
        help="set a FAILED file back to PENDING so the watch sensor processes it again",
        description=(
            "Set a FAILED file back to PENDING, moving it back from the error directory (ERROR_DIRECTORY) "
            "to where it was under WATCH_PATH, so the watch sensor processes it again; `s3proc dev` or a "
            "Dagster daemon must be running for that. An IN_PROGRESS file, a COMPLETED one (unless --force) "
            "and one the watch sensor cannot pick up (an archive entry, an S3 object, a file outside "
            "WATCH_PATH) are left alone, with the reason and what to do instead (exit status 1)."
        ),
    )
    retry.add_argument("paths", nargs="+", metavar="FILE", help=f"the file to retry: {FILE_ARGUMENT}")
    retry.add_argument(
        "--force",
        action="store_true",
        help=(
            "also reprocess a COMPLETED file: set it back to PENDING so the watch sensor processes it again "
            "(every step runs again; chunks already in S3 and verified are not uploaded again)"
        ),
    )
    retry.set_defaults(func=_retry)

    from s3proc_dagster.cli.images import register as register_images

    register_images(sub)

    dev = sub.add_parser(
        "dev",
        help="run it all locally: SeaweedFS as S3, the watch sensor and the Dagster UI",
        description=(
            "Start SeaweedFS as a local S3 (unless S3_ENDPOINT names another one; its S3 port is "
            "S3PROC_SEAWEEDFS_PORT, default 8333, or the port inside S3_ENDPOINT once .env holds it), "
            "write the Dagster instance to DAGSTER_HOME (default ./.dagster_home) and run `dagster dev`: "
            "the Dagster UI, the daemon and the sensors, with WATCH_PATH (default ./data/incoming) watched. "
            "On first start it writes its settings to .env (an existing .env is left alone) so other s3proc "
            "commands reach the same S3 and store. Ctrl-C, SIGTERM or SIGHUP stops all of it; a port "
            "already in use stops the start at once, naming the setting to change."
        ),
    )
    dev.add_argument(
        "--host",
        default=os.environ.get("S3PROC_UI_HOST", "127.0.0.1"),
        help=(
            "interface the Dagster UI listens on (default: $S3PROC_UI_HOST or 127.0.0.1; 0.0.0.0 for every "
            "interface). The UI has no authentication: anyone who reaches it can start and re-execute runs, "
            "so expose it only behind a proxy that authenticates (docs/security.md)"
        ),
    )
    dev.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("S3PROC_UI_PORT", "3000")),
        help="port of the Dagster UI (default: $S3PROC_UI_PORT or 3000)",
    )
    dev.set_defaults(func=_dev)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`s3proc status --json | head`): stop quietly.

    stdout is pointed at /dev/null so that the interpreter's final flush of what is
    still buffered cannot raise again at exit; 141 is what a shell reports for a
    command killed by SIGPIPE, so `set -o pipefail` scripts see the same as with `cat`.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    # The settings and the resources' `dg.EnvVar`s read one source, the environment, with
    # `.env` filling what is not set: the file `scripts/dev` writes reaches every command.
    load_dotenv(Path.cwd() / ".env", override=False)
    with contextlib.suppress(ValueError):  # a bad LOG_LEVEL: the settings check names it with the rest
        configure_logging(LoggingConfig())
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        # `s3proc` or `s3proc images` alone: the whole help beats argparse's one-line error
        (args.help_parser if hasattr(args, "help_parser") else parser).print_help(sys.stderr)
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except S3ProcError as exc:
        print(f"s3proc: {exc}", file=sys.stderr)
        return 2
