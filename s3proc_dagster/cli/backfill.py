"""`s3proc backfill`: one run per matching file, queued through a running Dagster webserver.

Through the webserver, not in this process as `process` does, so the instance's run
queue (MAX_CONCURRENCY, the per-file tag limit) paces a thousand files as it paces the
sensors' runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from s3proc_dagster.cli.common import back_to_pending, dagster_home, request_for
from s3proc_dagster.cli.zones import Zone, Zones, load_zones
from s3proc_dagster.errors import SettingsError
from s3proc_dagster.files import parking
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.settings import Configuration
from s3proc_dagster.sources.names import printable
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR, path_below
from s3proc_dagster.stores import open_store
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.zones.declared import declared_directories, zone_holding


@dataclass(frozen=True)
class BackfillFile:
    """A file a backfill queues a run for, and where it is until then."""

    path: str  # what its run reads: a path below WATCH_PATH (or its zone's source), or an s3:// URI
    relative_path: str
    record: FileStatus | None = None
    parked: str | None = None  # a FAILED file in the error directory: brought back to `path` first
    zone: Zone | None = None  # the landing zone it belongs to; None until selected

    @property
    def now(self) -> str:
        return self.parked or self.path


def _recorded_where(record: FileStatus, zone: Zone) -> BackfillFile | None:
    """A record's file where a run can read it again, or None (gone, or an archive entry,
    which its archive's run processes, or read from outside its zone's source: `s3proc process`)."""
    from s3proc_dagster.sources.confined import is_regular
    from s3proc_dagster.sources.resolve import relative_key
    from s3proc_dagster.transfer.keys import split_uri

    path = record.file_path
    if ENTRY_SEPARATOR in path:
        return None
    if "://" in path:
        return BackfillFile(path, relative_key(split_uri(path)[1], zone.incoming_prefix), record, zone=zone)
    rel = path_below(path, zone.watch)
    if rel is None:
        return None
    if is_regular(path):
        return BackfillFile(path, rel, record, zone=zone)
    parked = parking.parked_path(record, zone.watch, zone.error_dir)
    return BackfillFile(path, rel, record, parked, zone) if parked else None


def _why_left_out(record: FileStatus, zone: Zone) -> str:
    """Why `_recorded_where` found no file a run can read for `record`, and what to do."""
    path = record.file_path
    if ENTRY_SEPARATOR in path:
        return f"an archive entry: it runs with its archive, {path.split(ENTRY_SEPARATOR)[0]}"
    if path_below(path, zone.watch) is None:
        force = " --force" if record.status is ProcessingStatus.COMPLETED else ""  # else it skips the same version
        return f"not under {zone.watch}: `s3proc process{force} {shlex.quote(path)}` runs it"
    return "gone: neither where it was read nor in the error directory"


def left_out_of_backfill(
    zones: Zones, store: ProgressStore, status: str, selected: list[BackfillFile], zone: str | None = None
) -> list[tuple[str, str]]:
    """The records of `status` that `select_backfill` could not select, each with why: a user
    who counts them in `s3proc status` is told where each went rather than left to wonder
    (a file `s3proc process` read from elsewhere, one whose parked copy is gone, an entry of
    an archive the backfill does not run)."""
    chosen, paths = _chosen_zones(zones, zone), {f.path for f in selected}
    out = []
    for record in store.list_files(ProcessingStatus.parse(status)):
        mine = zones.of_record(record)
        if mine.name not in chosen or _recorded_where(record, mine) is not None:
            continue
        if record.file_path.split(ENTRY_SEPARATOR)[0] in paths:
            continue  # its archive is queued, and runs it
        out.append((record.file_path, _why_left_out(record, mine)))
    return sorted(out)


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
    zones: Zones,
    store: ProgressStore,
    since: str | None,
    status: str | None,
    pattern: str | None,
    zone: str | None = None,
) -> list[BackfillFile]:
    """The files matching every given filter (glob on the relative path, mtime since, status),
    in every enabled zone, or in the one named (`--zone`, which may name a disabled one).

    Without a status: the files under each zone's directory, as its sensor sees them. With
    one: the records of that status, each found where it is now, which for a FAILED file is
    its zone's error directory (it was moved there, so no scan of its source finds it), and
    for an object from S3 the object itself (a run reads it again)."""
    from s3proc_dagster.files.globs import path_matches

    chosen = _chosen_zones(zones, zone)
    if status:
        files = []
        for record in store.list_files(ProcessingStatus.parse(status)):
            mine = zones.of_record(record)
            if mine.name in chosen and (found := _recorded_where(record, mine)) is not None:
                files.append(found)
    else:
        files = [
            f for z in zones.all() if z.name in chosen and z.is_directory for f in _scanned(z, zones.default.error_dir)
        ]
    if pattern:
        files = [f for f in files if path_matches(f.relative_path, pattern)]
    if since:
        cutoff = datetime.fromisoformat(since).timestamp() * 1e9
        cfg = zones.default.cfg
        files = [f for f in files if (modified := _modified_ns(f, cfg)) is not None and modified >= cutoff]
    return sorted({f.path: f for f in files}.values(), key=lambda f: (_zone_name(f), f.relative_path))


def _zone_name(file: BackfillFile) -> str:
    return file.zone.name if file.zone is not None else ""


def _chosen_zones(zones: Zones, name: str | None) -> set[str]:
    """The zones a backfill selects in: a disabled zone only when named, since it was
    paused on purpose; an unknown name stops the backfill before anything is queued."""
    if name is None:
        return {z.name for z in zones.all() if z.enabled}
    if zones.named(name) is None or not name:
        problem = (zones.left_out or {}).get(name)
        known = ", ".join(z.name for z in zones.declared) or "none"
        reason = f"its settings do not load: {problem}" if problem else f"no such landing zone (declared: {known})"
        raise SettingsError(f"--zone {name}: {reason}")
    return {name}


def _scanned(zone: Zone, parked: Path) -> list[BackfillFile]:
    """A zone's directory as its sensor scans it: the default zone's without the declared
    zones' directories (their files are their sensors'), none of it when a zone's source is
    or holds WATCH_PATH; a declared zone's through its globs, without the deployment's error
    directory (`parked`, which its source may hold)."""
    from s3proc_dagster.defs.files.sensors import zone_admits
    from s3proc_dagster.sources.watch import scan

    processing = zone.cfg.processing
    skip = (processing.error_directory, processing.staging_directory)
    if zone.declared is None and zone_holding(zone.watch) is not None:
        seen = []  # WATCH_PATH is a declared zone's source, or inside one: its files are that zone's
    elif zone.declared is None:
        seen = scan(zone.watch, skip_dirs=(*skip, *declared_directories()))
    else:
        seen = [f for f in scan(zone.watch, skip_dirs=(*skip, parked)) if zone_admits(zone.cfg, f.relative_path)]
    return [BackfillFile(str(f.path), f.relative_path, zone=zone) for f in seen]


DEFAULT_UI_URL = "http://127.0.0.1:3000"


def find_ui(given: str | None) -> tuple[str, str]:
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
    finds it where the run reads it, PENDING. The watch sensor, which re-runs PENDING
    files, leaves one alone while a run for it is queued or running; should it tick in the
    moment between the two, the tag concurrency limit keeps the runs apart, and the later
    one finds the file COMPLETED (or FAILED and parked again) and skips it.
    """
    zones = load_zones()
    url, origin = find_ui(args.url)
    try:
        client = None if args.dry_run else _ui_client(url, origin)
    except UiUnreachable as exc:
        print(f"s3proc: {exc}", file=sys.stderr)
        return 1
    store = open_store(zones.default.cfg.processing)
    try:
        files = select_backfill(zones, store, args.since, args.status, args.glob, args.zone)
        for f in files:
            failed = f.record is not None and f.record.status is ProcessingStatus.FAILED
            marker = f.zone.marker if f.zone is not None else ""
            if args.dry_run:
                back = f"back to {f.path} and " if f.parked else ""
                line = f"would queue  {f.now}{marker}"
                print(printable(line + (f"  (FAILED: {back}PENDING first, as `s3proc retry`)" if failed else "")))
                continue
            run_id = _queue(client, store, zones, f, url)
            if run_id is None:
                return 1
            back = f"; back from {f.parked}" if f.parked else ""
            print(printable(f"queued {run_id[:8]}  {f.path}{marker}" + (f"  (was FAILED{back})" if failed else "")))
        if args.status and not (args.glob or args.since):  # filtered by path or time, the rest is not asked about
            for path, why in left_out_of_backfill(zones, store, args.status, files, args.zone):
                print(printable(f"left out  {path}  ({why})"), file=sys.stderr)
    finally:
        store.close()
    print(f"{len(files)} file(s) {'selected' if args.dry_run else 'queued'}")
    return 0


def _queue(client: Any, store: ProgressStore, zones: Zones, f: BackfillFile, url: str) -> str | None:
    """One file's run queued, as its zone's sensor would request it; None, said on stderr, when
    the webserver refuses it (a FAILED file is PENDING by then, for a sensor to pick up)."""
    from dagster_graphql import DagsterGraphQLClientError

    failed = f.record is not None and f.record.status is ProcessingStatus.FAILED
    if failed:
        zone = f.zone or zones.default
        back_to_pending(store, f.record, zone.watch, zone.error_dir)
    request = request_for(f.path, zones)
    tags = {**request.tags, "s3proc/backfill": "true"}
    try:
        return client.submit_job_execution(request.job_name, run_config=request.run_config, tags=tags)
    except DagsterGraphQLClientError as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        pending = "; it is PENDING now, so a sensor runs it again once a daemon runs" if failed else ""
        print(f"s3proc: {f.path}: not queued on {url} ({reason}){pending}", file=sys.stderr)
        return None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "backfill",
        help="queue one run per matching file, through the Dagster webserver",
        description=(
            "Queue one process_file_job run per file that matches every filter given, through a "
            "running Dagster webserver (`s3proc dev` or scripts/dev runs one); the instance's run "
            "queue then runs them, at most MAX_CONCURRENCY at once. Without --status the files are "
            "those under WATCH_PATH and under each declared landing zone's directory (an S3 prefix is "
            "not listed: its objects are its sensor's, or select them by --status); with it, the "
            "recorded files of that status wherever they are now: under WATCH_PATH, parked in the "
            "error directory (FAILED files), or in S3. A FAILED local file is first moved back to "
            "WATCH_PATH and set PENDING, as `s3proc retry` does; a FAILED object is set PENDING and "
            "read again from S3. An archive's entries run with their archive. A recorded file of that "
            "status that no run can read where it is (outside WATCH_PATH, gone) is named on stderr as "
            "left out, with why. Exit status 1 when no webserver answers."
        ),
    )
    parser.add_argument(
        "--glob",
        help=(
            "path pattern relative to WATCH_PATH (or to S3_INCOMING_PREFIX for an object, or to its "
            "landing zone's source), "
            "** for any folders, e.g. 'march2024/**/*.csv'"
        ),
    )
    parser.add_argument(
        "--since", help="only files modified at or after this ISO date or time, e.g. 2026-11-01 or 2026-11-01T08:00"
    )
    parser.add_argument(
        "--status",
        choices=["pending", "in_progress", "completed", "failed"],
        help=(
            "only files whose recorded status is this; `failed` finds them in the error directory "
            "and brings each back before its run is queued"
        ),
    )
    parser.add_argument(
        "--zone",
        metavar="NAME",
        help=(
            "only the files of this declared landing zone (its source, its error directory "
            "ERROR_DIRECTORY/NAME); without it, the files of every enabled zone and of WATCH_PATH, "
            "each run with its own zone's settings"
        ),
    )
    parser.add_argument(
        "--url",
        help=(
            "the Dagster webserver to queue the runs on (default: $S3PROC_UI_URL, which `s3proc dev` writes "
            "into the .env it wrote; else the URL `s3proc dev` last recorded in DAGSTER_HOME; else "
            f"{DEFAULT_UI_URL}, where scripts/dev serves it by default)"
        ),
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files that would be queued, where they are now; change nothing and contact no webserver",
    )
    parser.set_defaults(func=_backfill)
