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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import load_dotenv

from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.files import parking
from s3proc_dagster.logs import configure_logging
from s3proc_dagster.models import ChunkStatus, FileStatus, ProcessingStatus
from s3proc_dagster.names import SOURCE_TAG
from s3proc_dagster.settings import Configuration, LoggingConfig, load_configuration
from s3proc_dagster.sources.paths import (
    ENTRY_SEPARATOR,
    path_below,
    resolve_user_path,
)
from s3proc_dagster.stores import open_store
from s3proc_dagster.stores.base import ProgressStore

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


def dagster_home() -> Path:
    """DAGSTER_HOME, or the checkout's `.dagster_home` where `scripts/dev` writes the instance."""
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home")


def _started(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _file_runs(files: list[FileStatus], cfg: Configuration) -> tuple[dict[str, list[dict[str, Any]]] | None, str]:
    """Each file's runs, newest first, found by the tag every run of a file carries, its
    own or a batch's (`runs.tags.recorded_file_tag`); or None and why they cannot be listed.

    Read-only: unlike `get_instance`, no instance is written where there is none, and an
    instance that does not open (its PostgreSQL down) costs the listing, not the command."""
    import dagster as dg

    from s3proc_dagster.runs.tags import recorded_file_tag

    home = dagster_home()
    if not ((home / "dagster.yaml").is_file() or (home / "storage").is_dir()):
        return None, f"no Dagster instance at {home} (DAGSTER_HOME), so its runs are not listed"
    watch, error_dir = cfg.monitoring.watch_path, cfg.processing.error_directory
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for f in files:
                tag = recorded_file_tag(f, watch, error_dir, cfg.s3.incoming_prefix)
                found[f.file_id] = [
                    {
                        "runId": r.dagster_run.run_id,
                        "job": r.dagster_run.job_name,
                        "status": r.dagster_run.status.value,
                        "startTime": _started(r.start_time),
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


def _run_lines(runs: list[dict[str, Any]]) -> list[str]:
    if not runs:
        return ["    runs: none on the Dagster instance"]
    rows = [[r["runId"][:8], r["job"], r["status"], r["startTime"] or "-"] for r in runs]
    return ["    runs, newest first:", *_table(["run", "job", "status", "started (UTC)"], rows, right=set())]


def _status(args: argparse.Namespace) -> int:
    cfg = load_configuration()
    watch, error_dir = cfg.monitoring.watch_path, cfg.processing.error_directory
    store = open_store(cfg.processing)
    try:
        files = store.list_files()
        recorded = bool(files)
        if args.path:
            ref = resolve_user_path(args.path, watch, Path.cwd(), error_dir)
            files = [f for f in files if ref.matches(f)]
        chunks = {f.file_id: store.list_chunks(f.file_id) for f in files} if args.chunks else {}
    finally:
        store.close()
    parked = {f.file_id: parking.parked_path(f, watch, error_dir) for f in files}
    runs, no_runs = _file_runs(files, cfg) if args.path and files else ({}, "")
    if args.json:
        out = []
        for f in files:
            doc = f.to_document()
            doc["parkedPath"] = parked[f.file_id]
            if args.chunks:
                doc["chunks"] = [c.to_document() for c in chunks[f.file_id]]
            if args.path:
                doc["runs"] = None if runs is None else runs.get(f.file_id, [])
            out.append(doc)
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        if no_runs:
            print(f"s3proc: {no_runs}", file=sys.stderr)
    else:
        if not recorded and not args.path:
            print("no files recorded yet")
        for f in files:
            stats = f.processing_stats
            # where the file is now; an output only once there is one (COMPLETED)
            where = parked[f.file_id] or f.file_path
            output = f"  ->  {f.output_key}" if f.status is ProcessingStatus.COMPLETED and f.output_key else ""
            moved = f"  (parked in the error directory; read from {f.file_path})" if parked[f.file_id] else ""
            print(
                f"{f.status.name:<11} {stats.completed_chunks:>4}/{f.total_chunks:<4} chunks  {where}{output}{moved}"
                + (f"  error: {f.error_details}" if f.error_details else "")
            )
            if args.chunks:
                print("\n".join(_chunk_lines(chunks[f.file_id])))
            if args.path:
                print("\n".join(_run_lines(runs[f.file_id])) if runs is not None else f"    runs: {no_runs}")
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
        home = dagster_home()
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
    nothing to pick it up (the watch sensor re-runs only files on disk under WATCH_PATH).

    What no option changes comes first (an archive entry, an S3 object, a file outside
    WATCH_PATH), then what the file's state decides: so the advice given is never one a
    second try refuses (`--force` on an entry would only be told to retry the archive).
    """
    path = status.file_path
    if ENTRY_SEPARATOR in path:
        return f"is an entry of an archive: retry the archive, {path.partition(ENTRY_SEPARATOR)[0]}"
    if "://" in path:
        return f"came from S3, which the watch sensor does not re-read: run `s3proc process {path}`"
    if rel is None:
        return f"is not under WATCH_PATH, so the watch sensor would not see it: run `s3proc process {path}`"
    if status.status is ProcessingStatus.IN_PROGRESS:
        return "is IN_PROGRESS: a run is processing it (if that run died, crash recovery sets it back to PENDING)"
    if status.status is ProcessingStatus.COMPLETED and not force:
        return (
            "is COMPLETED, not FAILED: nothing to retry. To process it again, "
            "`s3proc retry --force` sets it back to PENDING and the watch sensor runs it again"
        )
    return None


def back_to_pending(store: ProgressStore, status: FileStatus, watch: Path, error_dir: Path) -> None:
    """The manual retry's two moves: a local original comes back from the error directory
    (unless a file is at its path again: that one is run, the parked copy left alone), and
    the record goes back to PENDING. `retry` and `backfill --status failed` both use it."""
    if "://" not in status.file_path and not Path(status.file_path).exists():
        parking.unpark(Path(status.file_path), watch, error_dir)
    store.reset_to_pending(status.file_id, None)


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
                was = status.status.name
                back_to_pending(store, status, watch, error_dir)
                print(f"PENDING    {path}  (was {was}; the watch sensor will run it again)")
    finally:
        store.close()
    return 1 if refused else 0


@dataclass(frozen=True)
class BackfillFile:
    """A file a backfill queues a run for, and where it is until then."""

    path: str  # what its run reads: a path below WATCH_PATH, or an s3:// URI
    relative_path: str
    record: FileStatus | None = None
    parked: str | None = None  # a FAILED file in the error directory: brought back to `path` first

    @property
    def now(self) -> str:
        return self.parked or self.path


def _recorded_where(record: FileStatus, watch: Path, error_dir: Path, incoming_prefix: str) -> BackfillFile | None:
    """A record's file where a run can read it again, or None (gone, or an archive entry,
    which its archive's run processes, or read from outside WATCH_PATH: `s3proc process`)."""
    from s3proc_dagster.sources.confined import is_regular
    from s3proc_dagster.sources.resolve import relative_key
    from s3proc_dagster.transfer.keys import split_uri

    path = record.file_path
    if ENTRY_SEPARATOR in path:
        return None
    if "://" in path:
        return BackfillFile(path, relative_key(split_uri(path)[1], incoming_prefix), record)
    rel = path_below(path, watch)
    if rel is None:
        return None
    if is_regular(path):
        return BackfillFile(path, rel, record)
    parked = parking.parked_path(record, watch, error_dir)
    return BackfillFile(path, rel, record, parked) if parked else None


def _modified_ns(file: BackfillFile, cfg: Configuration) -> int | None:
    """When the file where it is now was last modified (a parked file keeps its mtime)."""
    if "://" not in file.now:
        try:
            return os.stat(file.now).st_mtime_ns
        except FileNotFoundError:
            return None  # gone since it was found
    from s3proc_dagster.transfer.client import client_for
    from s3proc_dagster.transfer.keys import split_uri
    from s3proc_dagster.transfer.verify import head

    found = head(client_for(cfg.s3), *split_uri(file.now))
    return None if found is None else int(found["LastModified"].timestamp() * 1e9)


def select_backfill(
    cfg: Configuration, store: ProgressStore, since: str | None, status: str | None, pattern: str | None
) -> list[BackfillFile]:
    """The files matching every given filter (glob on the relative path, mtime since, status).

    Without a status: the files under WATCH_PATH, as the watch sensor sees them. With one:
    the records of that status, each found where it is now, which for a FAILED file is the
    error directory (it was moved there, so no scan of WATCH_PATH finds it), and for an
    object from S3 the object itself (a run reads it again)."""
    from s3proc_dagster.files.globs import path_matches
    from s3proc_dagster.sources.watch import scan

    watch, error_dir = cfg.monitoring.watch_path, cfg.processing.error_directory
    if status:
        records = store.list_files(ProcessingStatus.parse(status))
        located = (_recorded_where(r, watch, error_dir, cfg.s3.incoming_prefix) for r in records)
        files = [f for f in located if f is not None]
    else:
        seen = scan(watch, skip_dirs=(error_dir, cfg.processing.staging_directory))
        files = [BackfillFile(str(f.path), f.relative_path) for f in seen]
    if pattern:
        files = [f for f in files if path_matches(f.relative_path, pattern)]
    if since:
        cutoff = datetime.fromisoformat(since).timestamp() * 1e9
        files = [f for f in files if (modified := _modified_ns(f, cfg)) is not None and modified >= cutoff]
    return sorted({f.path: f for f in files}.values(), key=lambda f: f.relative_path)


DEFAULT_UI_URL = "http://127.0.0.1:3000"


def ui_url(given: str | None) -> tuple[str, str]:
    """The webserver `backfill` queues on, and where that came from (for the error message):
    --url; else S3PROC_UI_URL, from the environment or `.env` (where `s3proc dev` writes
    it into the `.env` it wrote itself); else what `s3proc dev` recorded in DAGSTER_HOME;
    else where `scripts/dev` serves it by default."""
    from dotenv import dotenv_values

    from s3proc_dagster.cli.dev import UI_URL_ENV, UI_URL_FILE, recorded_ui_url

    if given:
        return given, "--url"
    if url := os.environ.get(UI_URL_ENV):
        dotenv = Path.cwd() / ".env"
        in_dotenv = dotenv.is_file() and dotenv_values(dotenv).get(UI_URL_ENV) == url
        return url, f"{UI_URL_ENV} in {dotenv}" if in_dotenv else f"{UI_URL_ENV} in the environment"
    if url := recorded_ui_url(dagster_home()):
        return url, f"recorded by s3proc dev in {dagster_home() / UI_URL_FILE}"
    return DEFAULT_UI_URL, "the default"


class UiUnreachable(Exception):
    """No Dagster webserver answers where `backfill` would queue its runs."""


def _ui_client(url: str, origin: str) -> Any:
    """A GraphQL client on the webserver at `url`, once it has answered: a backfill against a
    UI that is not there stops before it changes anything, in one line naming the URL."""
    import urllib.request
    from urllib.parse import urlsplit

    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    advice = "start it (scripts/dev), or name the webserver with --url"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UiUnreachable(f"{url} ({origin}) is not an http:// or https:// URL: {advice}")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/server_info", timeout=10):
            pass
    except OSError as exc:  # URLError, HTTPError, a timeout: all "not a UI we can use"
        reason = getattr(exc, "reason", None) or exc
        raise UiUnreachable(f"no Dagster UI answers at {url} ({origin}; {reason}): {advice}") from None
    try:
        return DagsterGraphQLClient(
            parts.hostname,
            port_number=parts.port,
            use_https=parts.scheme == "https",
            path_prefix=parts.path.rstrip("/"),
        )
    except DagsterGraphQLClientError as exc:
        raise UiUnreachable(f"the Dagster UI at {url} ({origin}) did not take a client ({exc}): {advice}") from None


def _backfill(args: argparse.Namespace) -> int:
    """One queued run per matching file, through a running Dagster webserver's run queue.

    A FAILED file is first retried as `s3proc retry` does (`back_to_pending`), so its run
    finds it where the run reads it, PENDING. Should the watch sensor tick in between, it
    may request the file too (it re-runs PENDING files): the tag concurrency limit keeps
    the two runs apart, and the later one finds the file COMPLETED and skips it.
    """
    from dagster_graphql import DagsterGraphQLClientError

    cfg = load_configuration()
    watch, error_dir = cfg.monitoring.watch_path, cfg.processing.error_directory
    url, origin = ui_url(args.url)
    try:
        client = None if args.dry_run else _ui_client(url, origin)
    except UiUnreachable as exc:
        print(f"s3proc: {exc}", file=sys.stderr)
        return 1
    store = open_store(cfg.processing)
    try:
        files = select_backfill(cfg, store, args.since, args.status, args.glob)
        for f in files:
            failed = f.record is not None and f.record.status is ProcessingStatus.FAILED
            if args.dry_run:
                back = f"back to {f.path} and " if f.parked else ""
                print(
                    f"would queue  {f.now}" + (f"  (FAILED: {back}PENDING first, as `s3proc retry`)" if failed else "")
                )
                continue
            if failed:
                back_to_pending(store, f.record, watch, error_dir)
            request = request_for(f.path, cfg)
            tags = {**request.tags, "s3proc/backfill": "true"}
            try:
                run_id = client.submit_job_execution(request.job_name, run_config=request.run_config, tags=tags)
            except DagsterGraphQLClientError as exc:
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                pending = "; it is PENDING now, so a sensor runs it again once a daemon runs" if failed else ""
                print(f"s3proc: {f.path}: not queued on {url} ({reason}){pending}", file=sys.stderr)
                return 1
            back = f"; back from {f.parked}" if f.parked else ""
            print(f"queued {run_id[:8]}  {f.path}" + (f"  (was FAILED{back})" if failed else ""))
    finally:
        store.close()
    print(f"{len(files)} file(s) {'selected' if args.dry_run else 'queued'}")
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
  s3proc backfill --status failed --dry-run     list the FAILED files a backfill would run again
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
            "chunks done/total, where it is now (a FAILED file is parked in the error directory), where "
            "its output was written (COMPLETED files only) and the error if it failed. With PATH, also "
            "the runs that processed the file, its own and batch runs, from the Dagster instance at "
            "DAGSTER_HOME (default ./.dagster_home). Exit status 1 when PATH is given and no file matches it."
        ),
    )
    status.add_argument("path", nargs="?", metavar="PATH", help=f"show only this file: {FILE_ARGUMENT}")
    status.add_argument(
        "--json",
        action="store_true",
        help=(
            "print a JSON list with the stored field names (fileId, filePath, status, outputKey, "
            "s3Bucket/s3Key of a source object in S3, processingStats, errorSummary, errorDetails ...), "
            "plus parkedPath (where a FAILED file waits in the error directory now, else null) and, "
            'with PATH, "runs" (runId, job, status, startTime of each run that processed it)'
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
        help="queue one run per matching file, through the Dagster webserver",
        description=(
            "Queue one process_file_job run per file that matches every filter given, through a "
            "running Dagster webserver (`s3proc dev` or scripts/dev runs one); the instance's run "
            "queue then runs them, at most MAX_CONCURRENCY at once. Without --status the files are "
            "those under WATCH_PATH; with it, the recorded files of that status wherever they are now: "
            "under WATCH_PATH, parked in the error directory (FAILED files), or in S3. A FAILED file is "
            "first retried as `s3proc retry` does: moved back to WATCH_PATH and set PENDING. An archive's "
            "entries run with their archive. Exit status 1 when no webserver answers."
        ),
    )
    backfill.add_argument(
        "--glob",
        help=(
            "path pattern relative to WATCH_PATH (or to S3_INCOMING_PREFIX for an object), "
            "** for any folders, e.g. 'march2024/**/*.csv'"
        ),
    )
    backfill.add_argument(
        "--since", help="only files modified at or after this ISO date or time, e.g. 2026-11-01 or 2026-11-01T08:00"
    )
    backfill.add_argument(
        "--status",
        choices=["pending", "in_progress", "completed", "failed"],
        help=(
            "only files whose recorded status is this; `failed` finds them in the error directory "
            "and brings each back before its run is queued"
        ),
    )
    backfill.add_argument(
        "--url",
        help=(
            "the Dagster webserver to queue the runs on (default: $S3PROC_UI_URL, which `s3proc dev` writes "
            "into the .env it wrote; else the URL `s3proc dev` last recorded in DAGSTER_HOME; else "
            f"{DEFAULT_UI_URL}, where scripts/dev serves it by default)"
        ),
    )
    backfill.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files that would be queued, where they are now; change nothing and contact no webserver",
    )
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
