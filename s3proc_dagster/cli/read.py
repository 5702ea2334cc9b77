"""`s3proc read PATH_OR_DATASET`: a file's data back from S3, with only what the project installs.

The domain part (which output an argument names, reading a dataset's current version
through its manifest) is `transfer/read.py`; this module parses, checks the options
against each other, and chooses where the records go.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from s3proc_dagster.cli.common import FILE_ARGUMENT
from s3proc_dagster.cli.zones import load_zones
from s3proc_dagster.errors import ChecksumMismatch, NotReadable, ObjectUnreadable, RecordNotFound
from s3proc_dagster.settings import Configuration
from s3proc_dagster.stores import open_store
from s3proc_dagster.transfer import read
from s3proc_dagster.transfer.client import client_for, filesystem_for
from s3proc_dagster.transfer.manifest import MANIFEST_NAME

FORMATS = ("csv", "jsonl", "parts")
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
WRITERS = {"csv": read.write_csv, "jsonl": read.write_jsonl}


def _usage_problem(args: argparse.Namespace) -> str | None:
    """Options that contradict each other, found before anything is read."""
    if args.output is not None and args.format is not None:
        return "give --format or --output, not both: --output's extension chooses its format"
    if args.format == "parts" and args.limit is not None:
        return "--limit counts records; --format parts lists the Parquet parts"
    if args.limit is not None and args.limit < 0:
        return f"--limit {args.limit}: must be 0 or more"
    if args.output is not None and not args.output.parent.is_dir():
        return f"--output {args.output}: {args.output.parent} is not a directory"
    return None


def _read(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        print(f"s3proc read: {problem}", file=sys.stderr)
        return 2
    zones = load_zones()
    cfg = zones.default.cfg
    store = open_store(cfg.processing)
    try:
        files = store.list_files()
    finally:
        store.close()
    ref = zones.file_ref(args.target, Path.cwd())  # a declared zone's file by its zone's paths too
    try:
        output = read.locate(args.target, ref, files, client_for(cfg.s3), cfg.s3.bucket)
        return _emit(args, output, cfg)
    except (RecordNotFound, NotReadable, ObjectUnreadable, ChecksumMismatch) as exc:
        print(f"s3proc: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the reason holds
        return 1


def _emit(args: argparse.Namespace, output: read.Output, cfg: Configuration) -> int:
    if output.manifest is None:
        return _emit_object(args, output, cfg)
    if not output.parts(args.rejected):  # no part means no schema either: nothing to print a header from
        which = "rejected records (none failed validation, or no rule set selects it)" if args.rejected else "records"
        print(f"s3proc: {output.uri} has no {which}; nothing written", file=sys.stderr)
        return 0
    if args.format == "parts":
        for uri in output.part_uris(args.rejected):
            print(uri)
        return 0
    kind = OUTPUT_FORMATS.get(args.output.suffix.lower()) if args.output else (args.format or "csv")
    if kind is None:  # checked only now: a non-tabular file's bytes may go to any name
        known = ", ".join(OUTPUT_FORMATS)
        print(f"s3proc read: --output {args.output}: end its name with {known} to choose its format", file=sys.stderr)
        return 2
    records = read.read_records(filesystem_for(cfg.s3), output, args.rejected, args.limit)
    if args.output is None:
        WRITERS[kind](records, sys.stdout.buffer)
        return 0
    with read.replacing(args.output) as partial:
        if kind == "parquet":
            read.write_parquet(records, partial)
        else:
            with partial.open("wb") as sink:
                WRITERS[kind](records, sink)
    return 0


def _emit_object(args: argparse.Namespace, output: read.Output, cfg: Configuration) -> int:
    """A non-tabular file has no records: its URI, or its bytes into a file."""
    if args.rejected or args.limit is not None:
        raise NotReadable(f"{output.uri} is not tabular: it has no records to filter (--rejected, --limit)")
    if args.format == "parts":
        print(output.uri)
        return 0
    if args.output is None:
        raise NotReadable(
            f"{output.uri} is not tabular: `--format parts` prints its URI, `--output FILE` writes its bytes"
        )
    with read.replacing(args.output) as partial, partial.open("wb") as sink:
        read.copy_object(filesystem_for(cfg.s3), output, sink)
    return 0


DESCRIPTION = (
    "Read a processed file back from S3: the records of its dataset's current version, the one\n"
    f"its {MANIFEST_NAME} names (never a mix of two versions, even while a new one is committed),\n"
    "streamed from the Parquet parts one row group at a time. S3 and the progress store are the\n"
    "other commands' (S3_ENDPOINT, S3_BUCKET, S3_ACCESS_KEY_ID, PROGRESS_DB_PATH or MONGODB_URI).\n"
    "Exit status 1, with the reason on one line, when no file matches, the file is not COMPLETED\n"
    f"yet (its status is said), or its dataset has no {MANIFEST_NAME}; 2 when options contradict."
)
EXAMPLES = (
    "examples:\n"
    "  s3proc read nyc/flights.csv                            the records as CSV, header first\n"
    "  s3proc read nyc/flights.csv --limit 5 --format jsonl   the first five, a JSON object each\n"
    "  s3proc read s3://s3proc/nyc/flights.csv/ --format parts   the parts, for Spark, DuckDB, Athena\n"
    "  s3proc read nyc/flights.csv --output flights.parquet   the version as one Parquet file\n"
    "  s3proc read nyc/flights.csv --rejected                 the records that failed validation\n"
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "read",
        help="print a file's data from S3 (CSV, JSON lines), or its Parquet parts' URIs",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target",
        metavar="PATH_OR_DATASET",
        help=(
            f"the file, named as `s3proc status` takes it ({FILE_ARGUMENT}); or its dataset, "
            "s3://S3_BUCKET/S3_PREFIX/<path>/ or that key, read as committed whatever the store records"
        ),
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help=(
            "what to print: csv (the default: a header line, then a line a record; a nested value as its "
            "JSON text), jsonl (a JSON object a record), or parts (the s3:// URI of each Parquet part of "
            "the current version, one a line, in chunk order; for a non-tabular file, its own URI)"
        ),
    )
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="at most the first N records (0: the CSV header alone)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help=(
            "write to FILE instead of printing, in the format its extension names: .csv, .jsonl, or "
            ".parquet (ZSTD); for a non-tabular file, its bytes (checked against their SHA-256) whatever "
            "the name. FILE appears only once complete"
        ),
    )
    parser.add_argument(
        "--rejected",
        action="store_true",
        help=(
            "read the records that failed validation instead (the version's _rejected/ parts, with a "
            "_rules column naming the rules each record broke)"
        ),
    )
    parser.set_defaults(func=_read)
