"""The `s3proc` command: its top-level parser and `main`; each subcommand is a module of
its own (`status.py`, `read.py`, `process.py`, `backfill.py`, `retry.py`, `images.py`,
`dev.py`) with a `register(sub)`, and what several share is `common.py`.

Every help text has to stand alone: the user reading `s3proc retry --help` has neither
the README nor the specification in front of them. File arguments mean what
`sources.paths.resolve_user_path` says, the same for every command, read against each
declared landing zone too (`zones.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dotenv import load_dotenv

from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.logs import configure_logging
from s3proc_dagster.settings import LoggingConfig

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


COMMANDS = ("status", "read", "process", "backfill", "retry", "images", "dev")  # as `s3proc --help` lists them


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
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
    # Imported here, once `main` has loaded `.env`, not with this module: `images` imports
    # Dagster, which reads DAGSTER_* variables when it is imported. And only the command
    # asked for, when one is: `s3proc dev` supervises for hours, and importing `images` and
    # `read` kept Dagster, pyarrow and Pillow in it (70 MB); every command starts sooner too.
    chosen = next((a for a in (argv or ()) if not a.startswith("-")), None)
    for name in (chosen,) if chosen in COMMANDS else COMMANDS:
        importlib.import_module(f"s3proc_dagster.cli.{name}").register(sub)
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
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
