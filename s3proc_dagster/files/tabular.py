"""Tabular files to Parquet chunks with DuckDB, in one pass over the source.

DuckDB reads and types the source once (its sniffer infers the schema for the whole
file) and streams Arrow record batches in source order; each batch is cut at chunk
boundaries and appended to `part-NNNNN.parquet` by a pyarrow writer (`chunks.py`). So N
chunks cost one scan, never N scans with OFFSET, memory stays at a few batches, and every
chunk of a file has exactly the same schema (it is the stream's schema). Measured against
DuckDB's own `COPY ... TO 'x.parquet'` and `COPY ... PARTITION_BY (chunk)`: as fast as
the first, twice as fast as the second, which also needs more memory.

DuckDB types columns from a sample (20,480 rows). When a later value does not fit the
sampled type, the pass is thrown away and run once more with the whole file sampled:
a valid file never fails for it, and the common case still costs one scan.

Validation rides the same pass (`rules.py`), and the SELECT that evaluates the rules is
also where any later computed column belongs (`_select_sql`). XML has no DuckDB reader:
it is rewritten as CSV first (`xml.py`) and then read like any CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.chunks import ChunkFile, ChunkSink, clear_chunks, numbers_as_text, write_chunks
from s3proc_dagster.files.detect import is_tabular
from s3proc_dagster.files.lineage import Lineage
from s3proc_dagster.files.rules import (
    DEFAULT_MISSING_COLUMNS,
    MISSING_COLUMNS_POLICIES,
    MissingColumnsPolicy,
    Rule,
    RulePlan,
    plan_rules,
    rules_sql,
)
from s3proc_dagster.files.sql import duckdb_reason, sql_string
from s3proc_dagster.files.xml import xml_as_csv

if TYPE_CHECKING:  # pyarrow is imported where batches are read (see chunks.py)
    import pyarrow as pa

BATCH_ROWS = 122_880  # a multiple of DuckDB's 2,048-row vector
SCRATCH_DIR = ".scratch"  # DuckDB spill files and XML intermediates; removed at the end
# read_csv's own default, made explicit: only an empty field is NULL, so `NA` stays text.
DUCKDB_NULL_STRINGS: tuple[str, ...] = ("",)
CSV_DELIMITERS = (",", ";", "|", "\t")  # what a CSV's header may be split by; `,` first wins ties


@dataclass(frozen=True)
class ConversionResult:
    """`columns` are (name, DuckDB type), the one schema every chunk shares.

    `skipped_rules` maps each rule that did not run to why (`missing column offerExpiry`);
    `missing_columns` are the rule set's declared columns the file lacks. Both are empty
    when the file has everything its rule set needs, so a caller can record them as is.
    """

    record_count: int
    chunks: list[ChunkFile]
    columns: list[tuple[str, str]]
    duration_s: float
    skipped_rules: dict[str, str] = field(default_factory=dict)
    missing_columns: tuple[str, ...] = ()
    # text columns that are numbers but for a few words (`NA`): column -> those words
    numbers_as_text: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> str:
        """Kept beside the parts (`_done.json`), so a re-executed step reuses the conversion."""
        return json.dumps(dataclasses.asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> ConversionResult:
        data = json.loads(text)
        chunks = [
            ChunkFile(
                **{**c, "path": Path(c["path"]), "rejected_path": c["rejected_path"] and Path(c["rejected_path"])}
            )
            for c in data.pop("chunks")
        ]
        columns = [tuple(c) for c in data.pop("columns")]
        return cls(
            chunks=chunks,
            columns=columns,
            **{**data, "missing_columns": tuple(data.get("missing_columns", ()))},  # type: ignore[arg-type]
        )


class _SampledTypeTooNarrow(Exception):
    """A value later in the file does not fit the type DuckDB sampled; rerun on the whole file."""


def csv_delimiter(path: Path, kind: str) -> str:
    """A TSV's tab; for a CSV the one of `,` `;` `|` and tab that splits its header line into
    the most fields (`,` when none splits it, or on a tie): Excel and European tools write
    `;`, with decimal commas in the values, so the header decides, never a value."""
    if kind == "tsv":
        return "\t"
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = f.readline(64 * 1024)
    except (OSError, UnicodeDecodeError):
        return ","
    fields = {d: len(next(csv.reader([header], delimiter=d), [])) for d in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda d: fields[d])  # the first of the most: `,` on a tie
    return best if fields[best] > 1 else ","


def _reader_sql(
    kind: str, whole_file: bool = False, null_strings: Sequence[str] = DUCKDB_NULL_STRINGS, delimiter: str = ","
) -> str:
    """The DuckDB table function for a kind; the source path is always parameter $1.

    The delimiter is the one `csv_delimiter` found, the header is the first line and the quote is
    RFC 4180's: left to itself the sniffer reads a ragged file as one column, skips
    leading lines that do not fit, or decides a file has no quoting when its first
    quoted field comes after the sample, all silently wrong or failing late. The null
    strings are read as NULL before the sniffer types a column, so with `NA` among them
    a numeric column holding `NA` types as a number.
    """
    sample = ", sample_size = -1" if whole_file else ""
    if kind in ("csv", "tsv"):
        delim = "\t" if kind == "tsv" else delimiter  # a literal tab inside the SQL string
        nulls = "[" + ", ".join(sql_string(s) for s in null_strings) + "]"
        return (
            f"read_csv($1, header = true, delim = '{delim}', quote = '\"', skip = 0, strict_mode = true, "
            f"nullstr = {nulls}{sample})"
        )
    if kind == "json":
        return f"read_json($1, format = 'auto'{sample})"
    if kind == "jsonl":
        return f"read_json($1, format = 'newline_delimited'{sample})"
    raise ConversionError(f"no tabular reader for kind {kind!r}")


def _select_sql(reader: str, plan: RulePlan) -> str:
    """The single pass's SELECT: every source column, then whatever is computed per record."""
    return f"SELECT *{rules_sql(plan)} FROM {reader}"


def _connect(memory_limit: str, threads: int | None, scratch: Path) -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB that spills inside the output directory, not to /tmp."""
    conn = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(scratch / "duckdb")})
    conn.execute("SET enable_progress_bar = false")
    conn.execute(f"SET threads = {int(threads or min(4, os.cpu_count() or 1))}")
    # Order is the contract (chunk i = records i*size ...); it is DuckDB's default, made explicit.
    conn.execute("SET preserve_insertion_order = true")
    return conn


def warm_up() -> None:
    """One conversion of a two-row CSV, by a process that forks runs, before it forks them:
    DuckDB's and pyarrow's one-time setup (DuckDB's built-in catalog, the Parquet writer,
    the compute kernels) is then shared with every run instead of made again in each, 40 MB
    a run (measured in a forked child converting 30 small CSVs: 52 MB grown cold, 11.5
    warm). Every thread it starts is joined before it returns, so none is lost to a fork."""
    with tempfile.TemporaryDirectory(prefix="s3proc-warm-up-") as folder:
        sample = Path(folder) / "sample.csv"
        sample.write_text("id,code,amount\n1,A,1.5\n2,B,2.5\n")
        convert_to_parquet_chunks(sample, "csv", Path(folder) / "out", 10)


def _is_sampled_type_error(message: str) -> bool:
    return message.startswith("Conversion Error") or "JSON transform error" in message


def _check_json_array_closed(source: Path) -> None:
    """Refuse a JSON array without its closing bracket.

    DuckDB accepts `[{...}, {...},` (a file cut off after a comma) as a complete array, so
    a truncated upload would convert "successfully" with records missing.
    """
    with source.open("rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"["):
            return
        f.seek(max(0, source.stat().st_size - 64))
        tail = f.read().rstrip(b" \t\r\n")
    if not tail.endswith(b"]"):
        raise ConversionError(f"{source.name}: the JSON array has no closing ']'; the file looks truncated")


def _explain_csv_failure(conn: duckdb.DuckDBPyConnection, path: Path, kind: str, delim: str) -> str | None:
    """Name the line that broke the sniffer, which DuckDB's own message does not.

    When a ragged row falls inside the sniffer's sample, DuckDB only says it could not
    detect the dialect. Reading the file again with the dialect fixed and every column
    as text reports "CSV Error on Line: N ... Expected Number of Columns". Runs only
    after a failure.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delim), [])
    except (OSError, UnicodeDecodeError):
        return None
    if not header:
        return None
    columns = "{" + ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(header))) + "}"
    try:
        conn.execute(
            f"SELECT count(*) FROM read_csv($1, auto_detect = false, header = true, delim = '{delim}', "
            f"quote = '\"', escape = '\"', strict_mode = true, columns = {columns})",
            [str(path)],
        ).fetchall()
    except duckdb.Error as exc:
        return duckdb_reason(exc)
    return None


@dataclass(frozen=True)
class _Read:
    """How one file is read and validated; the same for both passes but `whole_file`."""

    source: Path  # the file as named to the user
    path: Path  # what DuckDB reads (the XML's CSV rewrite, or the source)
    kind: str
    null_strings: tuple[str, ...]
    rules: list[Rule]
    required_columns: tuple[str, ...]
    on_missing_columns: MissingColumnsPolicy
    lineage: Lineage | None = None
    check_columns: Callable[[list[tuple[str, str]], bool], None] | None = None
    delimiter: str = ","


def _open_stream(
    conn: duckdb.DuckDBPyConnection, read: _Read, whole_file: bool
) -> tuple[pa.RecordBatchReader, list[tuple[str, str]], RulePlan]:
    source, path, kind = read.source, read.path, read.kind
    reader = _reader_sql(kind, whole_file, read.null_strings, read.delimiter)
    try:
        plan = RulePlan()
        if read.rules or read.required_columns:
            plan = plan_rules(conn, source, reader, path, read.rules, read.required_columns, read.on_missing_columns)
        # The relation API streams; an execute() result would be copied whole into Arrow.
        relation = conn.sql(_select_sql(reader, plan), params=[str(path)])
        columns = [(n, str(t)) for n, t in zip(relation.columns, relation.types, strict=True) if n != "__rules"]
        return relation.to_arrow_reader(BATCH_ROWS), columns, plan
    except duckdb.Error as exc:
        reason = duckdb_reason(exc).replace(str(path), source.name)  # the file, not its staged copy
        if kind in ("csv", "tsv") and "sniffing" in reason:
            detail = _explain_csv_failure(conn, path, kind, "\t" if kind == "tsv" else read.delimiter)
            reason = f"{detail} (DuckDB could not detect the CSV dialect)" if detail else reason
        raise ConversionError(f"{source.name}: {reason}") from None


def _batches(reader: pa.RecordBatchReader, source: Path, path: Path) -> Iterator[pa.RecordBatch]:
    """Batches in source order; a read error (it arrives through Arrow) names the file.

    DuckDB's errors while streaming surface as a bare OSError from the Arrow reader, not
    as duckdb.Error; without this a ragged row past the sample would look like an I/O
    fault and be retried.
    """
    import pyarrow as pa

    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException, duckdb.Error) as exc:
            message = duckdb_reason(exc).replace(str(path), source.name)
            if _is_sampled_type_error(message):
                raise _SampledTypeTooNarrow(message) from None
            raise ConversionError(f"{source.name}: {message}") from None
        yield batch


def _one_pass(
    conn: duckdb.DuckDBPyConnection,
    read: _Read,
    out_dir: Path,
    chunk_size: int,
    compression: str,
    whole_file: bool,
    sink: ChunkSink | None,
) -> tuple[list[ChunkFile], list[tuple[str, str]], RulePlan, dict[str, list[str]]]:
    reader, columns, plan = _open_stream(conn, read, whole_file)
    first: list[pa.RecordBatch] = []
    try:
        batches, schema = _batches(reader, read.source, read.path), reader.schema
        if read.check_columns is not None:  # before a single row is written (or lands)
            peeked = next(batches, None)  # whether it has a record: a header alone has no types
            read.check_columns(columns, peeked is not None and peeked.num_rows > 0)
            batches = itertools.chain([peeked] if peeked is not None else [], batches)
        if read.lineage is not None:
            if clashes := read.lineage.clashes(schema.names):
                raise ConversionError(
                    f"{read.source.name}: has columns named like the zone's lineage columns ({', '.join(clashes)}), "
                    "which the zone adds itself (lineage_columns: true); rename them in the file"
                )
            batches, schema = read.lineage.apply(batches), read.lineage.schema(schema)
        chunks = write_chunks(batches, schema, out_dir, chunk_size, compression, plan.validates, sink, first)
        hints = numbers_as_text(first[0]) if first else {}
        return chunks, columns, plan, hints
    finally:
        reader.close()


def _passes(
    conn: duckdb.DuckDBPyConnection,
    read: _Read,
    out_dir: Path,
    chunk_size: int,
    compression: str,
    sink: ChunkSink | None,
) -> tuple[list[ChunkFile], list[tuple[str, str]], RulePlan, dict[str, list[str]]]:
    """The pass, and once more with the whole file sampled if a value outgrew its sampled type."""
    try:
        return _one_pass(conn, read, out_dir, chunk_size, compression, False, sink)
    except _SampledTypeTooNarrow:
        clear_chunks(out_dir)
        if sink is not None:
            sink.restart()
        try:
            return _one_pass(conn, read, out_dir, chunk_size, compression, True, sink)
        except _SampledTypeTooNarrow as exc:
            raise ConversionError(f"{read.source.name}: {exc}") from None


def _check_arguments(
    source: Path,
    kind: str,
    chunk_size: int,
    on_missing_columns: MissingColumnsPolicy,
    csv_null_strings: Sequence[str],
) -> None:
    """Refuse a caller's mistake before any output directory or DuckDB exists."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if on_missing_columns not in MISSING_COLUMNS_POLICIES:
        raise ValueError(f"on_missing_columns must be one of {', '.join(MISSING_COLUMNS_POLICIES)}")
    if not csv_null_strings:
        raise ValueError("csv_null_strings needs at least one string (DuckDB's default is the empty field)")
    if not is_tabular(kind):
        raise ConversionError(f"{source.name}: no tabular reader for kind {kind!r}")


def _readable(conn: duckdb.DuckDBPyConnection, source: Path, kind: str, scratch: Path) -> tuple[Path, str] | None:
    """What DuckDB reads for a file, and as which kind: the source, or an XML's CSV rewrite
    (None: the XML has no records). A truncated JSON array is refused here, before DuckDB
    would read it as whole."""
    if kind == "json":
        _check_json_array_closed(source)
    if kind == "xml":
        path = xml_as_csv(conn, source, scratch)
        return None if path is None else (path, "csv")
    return source, kind


# Over 60 lines with its twelve parameters and their docstring; the body is the
# conversion's outline, each step a function above.
def convert_to_parquet_chunks(
    source: Path,
    kind: str,
    out_dir: Path,
    chunk_size: int,
    compression: str = "ZSTD",
    memory_limit: str = "160MB",
    threads: int | None = None,
    rules: list[Rule] | None = None,
    required_columns: tuple[str, ...] = (),
    on_missing_columns: MissingColumnsPolicy = DEFAULT_MISSING_COLUMNS,
    csv_null_strings: Sequence[str] = DUCKDB_NULL_STRINGS,
    sink: ChunkSink | None = None,
    lineage: Lineage | None = None,
    check_columns: Callable[[list[tuple[str, str]], bool], None] | None = None,
) -> ConversionResult:
    """Convert in one pass; chunk i holds source records [i*size, min((i+1)*size, n) - 1].

    160 MB for DuckDB keeps a 1 GB CSV near 300 MB of process memory with two threads;
    much less and DuckDB runs out while keeping the rows in order.

    `required_columns` and `on_missing_columns` come from the rule set (see
    `validation.RuleSet`). `csv_null_strings` apply to CSV and TSV only: XML is rewritten
    to CSV by this module with NULL as the empty field, and a user's `NA` must not
    change how that rewrite is read.

    `sink` gets each chunk as soon as it is whole and the pass goes on, so its upload
    can overlap the rest of the conversion; it is told when the pass starts again.
    """
    _check_arguments(source, kind, chunk_size, on_missing_columns, csv_null_strings)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_chunks(out_dir)
    scratch = out_dir / SCRATCH_DIR
    scratch.mkdir(exist_ok=True)
    conn = _connect(memory_limit, threads, scratch)
    try:
        readable = _readable(conn, source, kind, scratch)
        if readable is None:
            return ConversionResult(0, [], [], time.perf_counter() - started)
        path, read_as = readable
        read = _Read(
            source=source,
            path=path,
            kind=read_as,
            null_strings=tuple(csv_null_strings) if kind in ("csv", "tsv") else DUCKDB_NULL_STRINGS,
            rules=list(rules or []),
            required_columns=tuple(required_columns),
            on_missing_columns=on_missing_columns,
            lineage=lineage,
            check_columns=check_columns,
            delimiter=csv_delimiter(path, kind) if kind == "csv" else ",",
        )
        chunks, columns, plan, hints = _passes(conn, read, out_dir, chunk_size, compression, sink)
    finally:
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)
    total = sum(c.record_count for c in chunks)
    return ConversionResult(
        total,
        chunks,
        columns,
        time.perf_counter() - started,
        skipped_rules=dict(plan.skipped),
        missing_columns=plan.missing_columns,
        numbers_as_text=hints if kind in ("csv", "tsv") else {},  # CSV_NULL_STRINGS applies to those only
    )
