"""Tabular files to Parquet chunks with DuckDB, in one pass over the source.

DuckDB reads and types the source once (its sniffer infers the schema for the whole
file) and streams Arrow record batches in source order; each batch is cut at chunk
boundaries and appended to `part-NNNNN.parquet` by a pyarrow writer. So N chunks cost
one scan, never N scans with OFFSET, memory stays at a few batches, and every chunk of a
file has exactly the same schema (it is the stream's schema). Measured against DuckDB's
own `COPY ... TO 'x.parquet'` and `COPY ... PARTITION_BY (chunk)`: as fast as the first,
twice as fast as the second, which also needs more memory.

DuckDB types columns from a sample (20,480 rows). When a later value does not fit the
sampled type, the pass is thrown away and run once more with the whole file sampled:
a valid file never fails for it, and the common case still costs one scan.

Validation rides the same pass: each rule is a SQL boolean over a record's columns,
evaluated inside the SELECT into a `__rules` list; valid and rejected records are then
split per batch with Arrow compute (vectorised, never a Python loop over records). That
SELECT is also where any later computed column belongs (`_select_sql`). Which rules run
is decided before the pass by binding each one against the file's columns
(`_plan_rules`): a rule set's `on_missing_columns` says what a file without a declared
column gets (fail it, skip the rules that need the column, or reject every record).

XML has no DuckDB reader: it is streamed through defusedxml into JSON lines, rewritten by
DuckDB as CSV and then read like any CSV, so its values are typed by the same sniffer.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args
from xml.etree.ElementTree import Element

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.detect import is_tabular

WRITER_LANES = 2
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
BATCH_ROWS = 122_880  # a multiple of DuckDB's 2,048-row vector
RULES_COLUMN = "_rules"
SCRATCH_DIR = ".scratch"  # DuckDB spill files and XML intermediates; removed at the end
SHAPE_TABLE = "__shape"  # the file's columns and types, no rows: rules are bound against it
# read_csv's own default, made explicit: only an empty field is NULL, so `NA` stays text.
DUCKDB_NULL_STRINGS: tuple[str, ...] = ("",)

MissingColumnsPolicy = Literal["fail", "skip_rules", "reject_records"]
MISSING_COLUMNS_POLICIES: tuple[str, ...] = get_args(MissingColumnsPolicy)
DEFAULT_MISSING_COLUMNS: MissingColumnsPolicy = "skip_rules"
# The `_rules` entry of every record of a file lacking a declared column, under reject_records.
MISSING_COLUMNS_RULE = "missingColumns"


@dataclass(frozen=True)
class Rule:
    """A named SQL boolean that is true for a bad record; `source` names where it came from."""

    name: str
    sql: str
    source: str = ""


@dataclass(frozen=True)
class ChunkFile:
    """One Parquet file holding source records [start_offset, end_offset]."""

    chunk_index: int
    path: Path
    start_offset: int
    end_offset: int
    record_count: int
    size_bytes: int
    failed_records: int = 0
    rule_counts: dict[str, int] = field(default_factory=dict)
    rejected_path: Path | None = None


class ChunkSink(Protocol):
    """Where whole chunks go while a conversion goes on, so their upload overlaps it."""

    def chunk(self, chunk: ChunkFile) -> None:
        """`chunk` is whole and the pass goes on; called on a writer thread."""

    def restart(self) -> None:
        """The pass is thrown away and run again: every chunk seen so far is void."""


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


@dataclass(frozen=True)
class _RulePlan:
    """What the pass evaluates: the rules that bind, and what was left out and why."""

    rules: list[Rule] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing_columns: tuple[str, ...] = ()
    reject_all: bool = False  # reject_records and a declared column is missing

    @property
    def validates(self) -> bool:
        """Whether the pass computes `__rules` (and so writes `_rejected/`)."""
        return bool(self.rules) or self.reject_all


class _SampledTypeTooNarrow(Exception):
    """A value later in the file does not fit the type DuckDB sampled; rerun on the whole file."""


# ---- reading ---------------------------------------------------------------------------------


def _reader_sql(kind: str, whole_file: bool = False, null_strings: Sequence[str] = DUCKDB_NULL_STRINGS) -> str:
    """The DuckDB table function for a kind; the source path is always parameter $1.

    The delimiter comes from the kind, the header is the first line and the quote is
    RFC 4180's: left to itself the sniffer reads a ragged file as one column, skips
    leading lines that do not fit, or decides a file has no quoting when its first
    quoted field comes after the sample, all silently wrong or failing late. The null
    strings are read as NULL before the sniffer types a column, so with `NA` among them
    a numeric column holding `NA` types as a number.
    """
    sample = ", sample_size = -1" if whole_file else ""
    if kind in ("csv", "tsv"):
        delim = "\t" if kind == "tsv" else ","  # a literal tab inside the SQL string
        nulls = "[" + ", ".join(_sql_string(s) for s in null_strings) + "]"
        return (
            f"read_csv($1, header = true, delim = '{delim}', quote = '\"', skip = 0, strict_mode = true, "
            f"nullstr = {nulls}{sample})"
        )
    if kind == "json":
        return f"read_json($1, format = 'auto'{sample})"
    if kind == "jsonl":
        return f"read_json($1, format = 'newline_delimited'{sample})"
    raise ConversionError(f"no tabular reader for kind {kind!r}")


def _sql_string(value: str) -> str:
    """A SQL string literal, for the few places DuckDB takes no parameter (COPY ... TO)."""
    return "'" + value.replace("'", "''") + "'"


def _identifier(name: str) -> str:
    """A quoted SQL identifier (a column name from a rule set)."""
    return '"' + name.replace('"', '""') + '"'


def _select_sql(reader: str, plan: _RulePlan) -> str:
    """The single pass's SELECT: every source column, then whatever is computed per record."""
    return f"SELECT *{_rules_sql(plan)} FROM {reader}"


def _rules_sql(plan: _RulePlan) -> str:
    if not plan.validates:
        return ""
    cases = [f"CASE WHEN ({r.sql}) THEN {_sql_string(r.name)} END" for r in plan.rules]
    if plan.reject_all:
        cases.insert(0, _sql_string(MISSING_COLUMNS_RULE))
    return f", list_filter([{', '.join(cases)}], lambda x: x IS NOT NULL) AS __rules"


def _connect(memory_limit: str, threads: int | None, scratch: Path) -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB that spills inside the output directory, not to /tmp."""
    conn = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(scratch / "duckdb")})
    conn.execute("SET enable_progress_bar = false")
    conn.execute(f"SET threads = {int(threads or min(4, os.cpu_count() or 1))}")
    # Order is the contract (chunk i = records i*size ...); it is DuckDB's default, made explicit.
    conn.execute("SET preserve_insertion_order = true")
    return conn


def _clean(exc: BaseException) -> str:
    """DuckDB's reason on one line, without its advice on reader options and its SQL echo.

    The user cannot set read_csv options, and the echoed SQL carries our full path.
    """
    message = " ".join(str(exc).split())
    for noise in (" Possible fixes:", " Possible solutions:", " Try increasing", " LINE 1:"):
        message = message.split(noise, 1)[0]
    return message[:600]


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


def _explain_csv_failure(conn: duckdb.DuckDBPyConnection, path: Path, kind: str) -> str | None:
    """Name the line that broke the sniffer, which DuckDB's own message does not.

    When a ragged row falls inside the sniffer's sample, DuckDB only says it could not
    detect the dialect. Reading the file again with the dialect fixed and every column
    as text reports "CSV Error on Line: N ... Expected Number of Columns". Runs only
    after a failure.
    """
    delim = "\t" if kind == "tsv" else ","
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
        return _clean(exc)
    return None


# ---- XML -------------------------------------------------------------------------------------


def _local(name: str) -> str:
    """`{namespace}tag` -> `tag`: a column name should not carry a URI."""
    return name.rsplit("}", 1)[-1]


def _xml_record(elem: Element) -> dict[str, str | None]:
    """Attributes and child elements (one level) of a record element become its columns."""
    record: dict[str, str | None] = {_local(k): v for k, v in elem.attrib.items()}
    children = list(elem)
    for child in children:
        text = (child.text or "").strip()
        record[_local(child.tag)] = text or None
    if not children and not record:
        record[_local(elem.tag)] = (elem.text or "").strip() or None
    return record


def xml_to_jsonl(source: Path, target: Path) -> list[str]:
    """Stream an XML file's records (the repeated children of its root) to JSON lines.

    Returns every column seen, in first-seen order (empty: no records). Parsed with
    defusedxml: a DTD entity or external reference is refused, so a file can neither read
    local files (XXE) nor expand itself a billion times. Each record is dropped from the
    tree once written, so memory does not grow with the file.
    """
    from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
    from defusedxml.ElementTree import iterparse

    columns: dict[str, None] = {}
    try:
        with target.open("w", encoding="utf-8") as out:
            events = iterparse(str(source), events=("start", "end"), forbid_dtd=False)
            _, root = next(events)  # the root's start; records are its children
            depth = 1
            for event, elem in events:
                if event == "start":
                    depth += 1
                    continue
                depth -= 1
                if depth != 1:
                    continue
                record = _xml_record(elem)
                columns.update(dict.fromkeys(record))
                out.write(json.dumps(record) + "\n")
                root.clear()
    except (EntitiesForbidden, ExternalReferenceForbidden, DTDForbidden) as exc:
        raise ConversionError(f"{source.name}: XML entities are forbidden ({type(exc).__name__})") from None
    except OSError:
        raise
    except Exception as exc:
        raise ConversionError(f"{source.name}: not well-formed XML ({exc})") from None
    return list(columns)


def _xml_as_csv(conn: duckdb.DuckDBPyConnection, source: Path, scratch: Path) -> Path | None:
    """XML -> JSON lines -> CSV, so that the CSV sniffer types the values (all text in XML).

    JSON would keep "42" a string. The JSON lines are read with every column named
    explicitly, so a column that first appears late in the file is not lost to sampling.
    """
    jsonl, target = scratch / "xml.jsonl", scratch / "xml.csv"
    columns = xml_to_jsonl(source, jsonl)
    if not columns:
        return None
    struct = "{" + ", ".join(f"{_sql_string(c)}: 'VARCHAR'" for c in columns) + "}"
    try:
        conn.execute(
            f"COPY (SELECT * FROM read_json($1, format = 'newline_delimited', columns = {struct})) "
            f"TO {_sql_string(str(target))} (FORMAT csv, HEADER, DELIMITER ',', QUOTE '\"')",
            [str(jsonl)],
        )
    except duckdb.Error as exc:
        raise ConversionError(f"{source.name}: {_clean(exc)}") from None
    jsonl.unlink()
    return target


# ---- the pass --------------------------------------------------------------------------------


def _bind_error(conn: duckdb.DuckDBPyConnection, rules: list[Rule], placeholders: tuple[str, ...] = ()) -> str | None:
    """DuckDB's reason the rules do not bind against the file's shape, or None.

    `placeholders` are columns added as untyped NULLs: a rule that binds only with them
    needs exactly those columns, and nothing else is wrong with it. An untyped NULL
    casts implicitly to any type, so `"offerExpiry" < DATE '...'` and
    `regexp_full_match("promoCode", ...)` both bind against it.
    """
    extra = "".join(f", NULL AS {_identifier(c)}" for c in placeholders)
    try:
        conn.execute(f"SELECT {', '.join(f'({r.sql})' for r in rules)} FROM (SELECT *{extra} FROM {SHAPE_TABLE})")
    except duckdb.Error as exc:
        return _clean(exc)
    return None


def _plan_rules(
    conn: duckdb.DuckDBPyConnection,
    source: Path,
    reader: str,
    path: Path,
    rules: list[Rule],
    required: tuple[str, ...],
    on_missing_columns: MissingColumnsPolicy,
) -> _RulePlan:
    """Decide which rules the pass evaluates, before it starts; fail naming the rule file and rule.

    The file is sniffed once into an empty table of its columns and types (a LIMIT 0
    query: DuckDB samples the file, it does not scan it) and every rule is bound against
    that table. Binding against the reader instead would sniff the file again for each
    check: on a 3-million-row CSV sampled whole (the re-read after a type misfit) that is
    about 1 s per check, against 1 ms for a bind against the empty table.

    A rule is skipped only for a column the rule set declares under `columns`: a rule
    naming a column neither the file nor the rule set has is a typo, and fails the file.
    DuckDB matches column names without regard to case, and so does this check.
    """
    conn.execute(f"CREATE OR REPLACE TEMP TABLE {SHAPE_TABLE} AS SELECT * FROM {reader} LIMIT 0", [str(path)])
    present = {row[0].lower() for row in conn.execute(f"DESCRIBE {SHAPE_TABLE}").fetchall()}
    missing = tuple(c for c in required if c.lower() not in present)
    origin = rules[0].source.split(": rule")[0] if rules else "rule set"
    if missing and on_missing_columns == "fail":
        raise ConversionError(f"{source.name}: {origin} needs column(s) {', '.join(missing)}, which the file lacks")
    reject_all = bool(missing) and on_missing_columns == "reject_records"
    if not rules or _bind_error(conn, rules) is None:  # all rules bound at once, the common case
        return _RulePlan(list(rules), {}, missing, reject_all)
    active: list[Rule] = []
    skipped: dict[str, str] = {}
    for rule in rules:
        if _bind_error(conn, [rule]) is None:
            active.append(rule)
            continue
        error = _bind_error(conn, [rule], missing)
        if error is not None:  # wrong even with every missing column supplied: the rule itself
            raise ConversionError(f"{source.name}: {rule.source or rule.name}: {error}")
        # The columns it cannot do without: it fails to bind when only that one is left out.
        needed = [c for c in missing if _bind_error(conn, [rule], tuple(m for m in missing if m != c)) is not None]
        needed = needed or list(missing)  # COALESCE("y", "z") needs either, so both are named
        skipped[rule.name] = f"missing column{'s' if len(needed) > 1 else ''} {', '.join(needed)}"
    return _RulePlan(active, skipped, missing, reject_all)


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


def _open_stream(
    conn: duckdb.DuckDBPyConnection, read: _Read, whole_file: bool
) -> tuple[pa.RecordBatchReader, list[tuple[str, str]], _RulePlan]:
    source, path, kind = read.source, read.path, read.kind
    reader = _reader_sql(kind, whole_file, read.null_strings)
    try:
        plan = _RulePlan()
        if read.rules or read.required_columns:
            plan = _plan_rules(conn, source, reader, path, read.rules, read.required_columns, read.on_missing_columns)
        # The relation API streams; an execute() result would be copied whole into Arrow.
        relation = conn.sql(_select_sql(reader, plan), params=[str(path)])
        columns = [(n, str(t)) for n, t in zip(relation.columns, relation.types, strict=True) if n != "__rules"]
        return relation.to_arrow_reader(BATCH_ROWS), columns, plan
    except duckdb.Error as exc:
        reason = _clean(exc)
        if kind in ("csv", "tsv") and "sniffing" in reason:
            detail = _explain_csv_failure(conn, path, kind)
            reason = f"{detail} (DuckDB could not detect the CSV dialect)" if detail else reason
        raise ConversionError(f"{source.name}: {reason}") from None


def _batches(reader: pa.RecordBatchReader, source: Path) -> Iterator[pa.RecordBatch]:
    """Batches in source order; a read error (it arrives through Arrow) names the file.

    DuckDB's errors while streaming surface as a bare OSError from the Arrow reader, not
    as duckdb.Error; without this a ragged row past the sample would look like an I/O
    fault and be retried.
    """
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException, duckdb.Error) as exc:
            message = _clean(exc)
            if _is_sampled_type_error(message):
                raise _SampledTypeTooNarrow(message) from None
            raise ConversionError(f"{source.name}: {message}") from None
        yield batch


def _slices(batches: Iterator[pa.RecordBatch], chunk_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(chunk index, piece) in source order, pieces cut exactly at chunk boundaries."""
    offset = 0
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            index = offset // chunk_size
            room = (index + 1) * chunk_size - offset
            piece = batch.slice(start, min(room, batch.num_rows - start))
            yield index, piece
            start += piece.num_rows
            offset += piece.num_rows


class _ChunkWriter:
    """Writes one chunk's valid records (and rejected ones, when rules are on)."""

    def __init__(
        self, out_dir: Path, index: int, schema: pa.Schema, compression: str, with_rules: bool, dictionary: list[str]
    ) -> None:
        self.index = index
        self.path = out_dir / f"part-{index:05d}.parquet"
        self.rejected_path = out_dir / "_rejected" / f"part-{index:05d}.parquet" if with_rules else None
        self.data_schema = schema.remove(schema.get_field_index("__rules")) if with_rules else schema
        self.writer = pq.ParquetWriter(
            self.path, self.data_schema, compression=compression.lower(), use_dictionary=dictionary
        )
        self.rejected_writer: pq.ParquetWriter | None = None
        self.compression = compression
        self.records = 0
        self.failed = 0
        self.rule_counts: dict[str, int] = {}

    def write(self, piece: pa.RecordBatch) -> None:
        self.records += piece.num_rows
        if self.rejected_path is None:
            self.writer.write_batch(piece)
            return
        rules = piece.column("__rules")
        bad = pc.greater(pc.list_value_length(rules), 0)
        table = pa.Table.from_batches([piece])
        good = table.filter(pc.invert(bad)).drop_columns(["__rules"])
        if good.num_rows:
            self.writer.write_table(good)
        rejected = table.filter(bad)
        if rejected.num_rows:
            self.failed += rejected.num_rows
            names = pc.value_counts(pc.list_flatten(rejected.column("__rules")))
            for item in names.to_pylist():
                self.rule_counts[item["values"]] = self.rule_counts.get(item["values"], 0) + item["counts"]
            rejected = rejected.rename_columns([RULES_COLUMN if c == "__rules" else c for c in rejected.column_names])
            if self.rejected_writer is None:
                self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
                self.rejected_writer = pq.ParquetWriter(
                    self.rejected_path, rejected.schema, compression=self.compression.lower()
                )
            self.rejected_writer.write_table(rejected)

    def discard(self) -> None:
        """After a failed pass: release the files, so a retry starts from nothing."""
        for writer in (self.writer, self.rejected_writer):
            with contextlib.suppress(Exception):
                if writer is not None:
                    writer.close()
        for path in (self.path, self.rejected_path):
            if path is not None:
                path.unlink(missing_ok=True)

    def close(self, chunk_size: int) -> ChunkFile:
        self.writer.close()
        if self.rejected_writer is not None:
            self.rejected_writer.close()
        start = self.index * chunk_size
        return ChunkFile(
            chunk_index=self.index,
            path=self.path,
            start_offset=start,
            end_offset=start + self.records - 1,
            record_count=self.records,
            size_bytes=self.path.stat().st_size,
            failed_records=self.failed,
            rule_counts=dict(self.rule_counts),
            rejected_path=self.rejected_path if self.rejected_writer is not None else None,
        )


def _dictionary_columns(batch: pa.RecordBatch) -> list[str]:
    """Columns worth dictionary encoding, judged once per file on its first batch.

    Dictionary encoding pays for repeated values (a status, a date) but on a column of
    unique ids it fills a 1 MB dictionary, falls back to plain and leaves a bigger file:
    on the benchmark CSV, dictionary everywhere took 25% longer, 10% more memory and
    wrote 79 MB where this choice writes about 62 MB. One choice for the whole file
    keeps the chunks alike.
    """
    chosen = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_nested(column.type) or not batch.num_rows:
            continue
        if pc.count_distinct(column, mode="all").as_py() <= batch.num_rows // 2:
            chosen.append(name)
    return chosen


def numbers_as_text(batch: pa.RecordBatch, min_share: float = 0.8, max_words: int = 3) -> dict[str, list[str]]:
    """Text columns whose values are numbers but for a few distinct words, judged on the
    first batch: DuckDB typed them as text because of a null marker such as `NA`, which
    CSV_NULL_STRINGS would read as NULL. Said where the user sees the result (the file's
    materialization), not deep in the docs."""
    found: dict[str, list[str]] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        values = column.drop_null()
        if not len(values):
            continue
        numeric = pc.match_substring_regex(values, _NUMBER)
        share = pc.sum(numeric).as_py() / len(values)
        words = pc.unique(values.filter(pc.invert(numeric))).to_pylist()
        if min_share <= share < 1 and len(words) <= max_words:
            found[name] = sorted(words)
    return found


def _write_chunks(
    reader: pa.RecordBatchReader,
    source: Path,
    out_dir: Path,
    chunk_size: int,
    compression: str,
    with_rules: bool,
    sink: ChunkSink | None = None,
    first_batch: list[pa.RecordBatch] | None = None,
) -> list[ChunkFile]:
    """DuckDB produces the next batch while writer threads encode the previous ones.

    Each chunk stays on one writer ("lane"), so its records keep their order; neighbouring
    chunks are encoded in parallel, and at most a few batches are in flight. `sink` gets
    each chunk that closed while the pass goes on (every chunk but the last, which is
    only known to be whole when the source ends).
    """
    chunks: list[ChunkFile] = []
    current: _ChunkWriter | None = None
    dictionary: list[str] | None = None
    pending: deque[Future[None]] = deque()
    lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"parquet-writer-{i}") for i in range(WRITER_LANES)]

    def close(writer: _ChunkWriter, going_on: bool) -> None:
        chunk = writer.close(chunk_size)
        chunks.append(chunk)
        if going_on and sink is not None:
            sink.chunk(chunk)

    finished = False
    try:
        for index, piece in _slices(_batches(reader, source), chunk_size):
            if current is None or current.index != index:
                if current is not None:
                    pending.append(lanes[current.index % WRITER_LANES].submit(close, current, True))
                if dictionary is None:
                    dictionary = _dictionary_columns(piece)
                    if first_batch is not None:
                        first_batch.append(piece)
                current = _ChunkWriter(out_dir, index, reader.schema, compression, with_rules, dictionary)
            pending.append(lanes[index % WRITER_LANES].submit(current.write, piece))
            while len(pending) > 2 * WRITER_LANES:
                pending.popleft().result()
        if current is not None:
            pending.append(lanes[current.index % WRITER_LANES].submit(close, current, False))
        while pending:
            pending.popleft().result()
        finished = True
    finally:
        for lane in lanes:
            lane.shutdown(wait=True)
        if not finished and current is not None:
            current.discard()
    return sorted(chunks, key=lambda c: c.chunk_index)


def _clear_outputs(out_dir: Path) -> None:
    """Parts of an earlier, interrupted attempt must not be mistaken for this one's."""
    for stale in [*out_dir.glob("part-*.parquet"), *out_dir.glob("_rejected/part-*.parquet")]:
        stale.unlink()


def _one_pass(
    conn: duckdb.DuckDBPyConnection,
    read: _Read,
    out_dir: Path,
    chunk_size: int,
    compression: str,
    whole_file: bool,
    sink: ChunkSink | None,
) -> tuple[list[ChunkFile], list[tuple[str, str]], _RulePlan, dict[str, list[str]]]:
    reader, columns, plan = _open_stream(conn, read, whole_file)
    first: list[pa.RecordBatch] = []
    try:
        chunks = _write_chunks(reader, read.source, out_dir, chunk_size, compression, plan.validates, sink, first)
        hints = numbers_as_text(first[0]) if first else {}
        return chunks, columns, plan, hints
    finally:
        reader.close()


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
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if on_missing_columns not in MISSING_COLUMNS_POLICIES:
        raise ValueError(f"on_missing_columns must be one of {', '.join(MISSING_COLUMNS_POLICIES)}")
    if not csv_null_strings:
        raise ValueError("csv_null_strings needs at least one string (DuckDB's default is the empty field)")
    if not is_tabular(kind):
        raise ConversionError(f"{source.name}: no tabular reader for kind {kind!r}")
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    scratch = out_dir / SCRATCH_DIR
    scratch.mkdir(exist_ok=True)
    conn = _connect(memory_limit, threads, scratch)
    try:
        path, read_as = source, kind
        if kind == "json":
            _check_json_array_closed(source)
        if kind == "xml":
            path, read_as = _xml_as_csv(conn, source, scratch), "csv"
            if path is None:
                return ConversionResult(0, [], [], time.perf_counter() - started)
        read = _Read(
            source=source,
            path=path,
            kind=read_as,
            null_strings=tuple(csv_null_strings) if kind in ("csv", "tsv") else DUCKDB_NULL_STRINGS,
            rules=list(rules or []),
            required_columns=tuple(required_columns),
            on_missing_columns=on_missing_columns,
        )
        try:
            chunks, columns, plan, hints = _one_pass(conn, read, out_dir, chunk_size, compression, False, sink)
        except _SampledTypeTooNarrow:
            _clear_outputs(out_dir)
            if sink is not None:
                sink.restart()
            try:
                chunks, columns, plan, hints = _one_pass(conn, read, out_dir, chunk_size, compression, True, sink)
            except _SampledTypeTooNarrow as exc:
                raise ConversionError(f"{source.name}: {exc}") from None
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
