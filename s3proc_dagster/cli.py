"""The `s3proc` command: status, process, retry, backfill, images, and `dev` (the README's run command)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.settings import load_configuration
from s3proc_dagster.stores import open_store


def _status(args: argparse.Namespace) -> int:
    cfg = load_configuration()
    store = open_store(cfg.processing)
    try:
        files = store.list_files()
        if args.path:
            wanted = str(Path(args.path).resolve()) if "://" not in args.path else args.path
            files = [f for f in files if f.file_path in (wanted, args.path) or f.file_id == args.path]
        if args.json:
            out = []
            for f in files:
                doc = f.to_seed()
                if args.chunks:
                    doc["chunks"] = [c.to_seed() for c in store.list_chunks(f.file_id)]
                out.append(doc)
            json.dump(out, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        if not files:
            print("no files recorded yet")
        for f in files:
            stats = f.processing_stats
            print(
                f"{f.status.name:<11} {stats.completed_chunks:>4}/{f.total_chunks:<4} chunks  "
                f"{f.file_path}  ->  {f.output_key or '-'}"
                + (f"  error: {f.error_details}" if f.error_details else "")
            )
        return 0
    finally:
        store.close()


def _process(args: argparse.Namespace) -> int:
    from s3proc_dagster.defs.runs import get_instance, relative_to_watch, run_file

    cfg = load_configuration()
    instance = get_instance()
    store = open_store(cfg.processing)
    failed = 0
    try:
        for raw in args.paths:
            if raw.startswith("s3://"):
                key = raw.removeprefix("s3://").partition("/")[2]
                incoming = cfg.s3.incoming_prefix + "/" if cfg.s3.incoming_prefix else ""
                target, rel = raw, key.removeprefix(incoming)
            else:
                path = Path(raw).resolve()
                target, rel = str(path), relative_to_watch(path, cfg.monitoring.watch_path)
            outcome = run_file(target, rel, instance)
            status = store.get_by_path(target)
            state = status.status.name if status else ("FAILED" if not outcome.success else "SKIPPED")
            detail = (status.output_key or "") if status and outcome.success else (status.error_details if status else "")
            failed += not outcome.success
            print(f"{state:<10} {raw}  {detail or ''}  (run {outcome.run_id[:8]})")
    finally:
        store.close()
    return 1 if failed else 0


def _retry(args: argparse.Namespace) -> int:
    """The seed's manual retry: the original comes back from the error directory, the
    record goes FAILED -> PENDING, and the watch sensor runs it again under a new key."""
    cfg = load_configuration()
    store = open_store(cfg.processing)
    try:
        for raw in args.paths:
            path = Path(raw).resolve()
            error_dir = cfg.processing.error_directory
            if path.is_relative_to(error_dir):
                rel = path.relative_to(error_dir)
                path = cfg.monitoring.watch_path / rel
            status = store.get_by_path(str(path))
            if status is None:
                raise S3ProcError(f"{raw}: no such file in the progress store")
            parked = error_dir / path.relative_to(cfg.monitoring.watch_path)
            if parked.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                parked.rename(path)
                parked.with_name(parked.name + ".error.json").unlink(missing_ok=True)
            store.reset_to_pending(status.file_id, None)
            print(f"PENDING    {path}")
    finally:
        store.close()
    return 0


def select_backfill(cfg, store, since: str | None, status: str | None, pattern: str | None) -> list[Path]:
    """Files under WATCH_PATH matching every given filter (glob, mtime since, store status)."""
    from datetime import datetime

    from s3proc_dagster.models import ProcessingStatus
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

    from s3proc_dagster.defs.files.sensors import run_request_for
    from s3proc_dagster.defs.runs import relative_to_watch

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
        tags = {**request.tags, "s3proc/backfill": "true"}
        if args.dry_run:
            print(f"would queue  {path}")
            continue
        run_id = client.submit_job_execution(request.job_name, run_config=request.run_config, tags=tags)
        print(f"queued {run_id[:8]}  {path}")
    print(f"{len(paths)} file(s) {'selected' if args.dry_run else 'queued'}")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from s3proc_dagster.launcher import run_dev

    return run_dev(host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s3proc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    status = sub.add_parser("status", help="every tracked file with its status, chunks and S3 key")
    status.add_argument("path", nargs="?", help="only this file (path, s3:// URI or fileId)")
    status.add_argument("--json", action="store_true", help="print a JSON list in the seed's field names")
    status.add_argument("--chunks", action="store_true", help="with --json, include each file's chunks")
    status.set_defaults(func=_status)

    process = sub.add_parser("process", help="run process_file_job for these files now, through the instance")
    process.add_argument("paths", nargs="+")
    process.set_defaults(func=_process)

    backfill = sub.add_parser("backfill", help="queue one run per matching file through the run queue")
    backfill.add_argument("--glob", help="relative path pattern, e.g. 'march2024/**/*.csv'")
    backfill.add_argument("--since", help="files modified at or after this ISO date/time")
    backfill.add_argument("--status", choices=["pending", "in_progress", "completed", "failed"])
    backfill.add_argument("--url", default="http://127.0.0.1:3000", help="the Dagster webserver (dagster dev)")
    backfill.add_argument("--dry-run", action="store_true")
    backfill.set_defaults(func=_backfill)

    retry = sub.add_parser("retry", help="move a FAILED file back from the error directory and set it PENDING")
    retry.add_argument("paths", nargs="+")
    retry.set_defaults(func=_retry)

    from s3proc_dagster.cli_images import register as register_images

    register_images(sub)

    dev = sub.add_parser(
        "dev",
        help="start SeaweedFS (unless S3_ENDPOINT is set) and `dagster dev`",
        description=(
            "Start SeaweedFS as the local S3 (unless S3_ENDPOINT names another S3; its port is "
            "S3PROC_SEAWEEDFS_PORT, default 8333, or the port inside S3_ENDPOINT once .env holds it) "
            "and `dagster dev` with the Dagster UI. Ctrl-C, SIGTERM or SIGHUP stops all of it. "
            "A port already in use stops the start at once, naming the setting to change."
        ),
    )
    dev.add_argument(
        "--host",
        default=os.environ.get("S3PROC_UI_HOST", "127.0.0.1"),
        help="interface the Dagster UI listens on (default: $S3PROC_UI_HOST or 127.0.0.1; 0.0.0.0 for every interface)",
    )
    dev.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("S3PROC_UI_PORT", "3000")),
        help="port of the Dagster UI (default: $S3PROC_UI_PORT or 3000)",
    )
    dev.set_defaults(func=_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except S3ProcError as exc:
        print(f"s3proc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
