"""Tabular files to Parquet chunks with DuckDB, in one pass over the source.

DuckDB reads and types the source once (its sniffer infers the schema for the whole
file) and streams Arrow record batches in source order; each batch is cut at chunk
boundaries and appended to `part-NNNNN.parquet` by a pyarrow writer. So N chunks cost
one scan, never N scans with OFFSET, memory stays at a few batches, and every chunk of a
file has exactly the same schema (it is the stream's schema).

Validation rides the same pass: each rule is a SQL boolean over a record's columns,
evaluated inside the SELECT into a `__rules` list; valid and rejected records are then
split per batch with Arrow compute (vectorised, never a Python loop over records).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from s3proc_dagster.errors import ConversionError

WRITER_LANES = 2
BATCH_ROWS = 122_880  # a multiple of DuckDB's 2,048-row vector
RULES_COLUMN = "_rules"


@dataclass(frozen=True)
class Rule:
    """A named SQL boolean that is true for a bad record; `source` names where it came from."""

    name: str
    sql: str
    source: str = ""


@dataclass(frozen=True)
class ChunkFile:
    chunk_index: int
    path: Path
    start_offset: int
    end_offset: int
    record_count: int
    size_bytes: int
    failed_records: int = 0
    rule_counts: dict[str, int] = field(default_factory=dict)
    rejected_path: Path | None = None


@dataclass(frozen=True)
class ConversionResult:
    record_count: int
    chunks: list[ChunkFile]
    columns: list[tuple[str, str]]
    duration_s: float


def _reader_sql(kind: str) -> str:
    # The delimiter comes from the file's kind, and the header is the first line: left to
    # itself the sniffer reads a ragged file as one column, or skips leading lines that do
    # not fit, both silently wrong.
    if kind == "csv":
        return "read_csv($1, header = true, delim = ',', skip = 0, strict_mode = true)"
    if kind == "tsv":
        return "read_csv($1, header = true, delim = '\t', skip = 0, strict_mode = true)"
    if kind == "json":
        return "read_json($1, format = 'auto')"
    if kind in ("jsonl", "xml"):
        return "read_json($1, format = 'newline_delimited')"
    raise ConversionError(f"no tabular reader for kind {kind!r}")


def xml_to_jsonl(source: Path, target: Path) -> int:
    """Stream an XML file's repeated record elements (children of the root) to JSON lines.

    Parsed with defusedxml: a DTD entity or external reference is refused, so a file can
    neither read local files (XXE) nor expand itself a billion times.
    """
    from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
    from defusedxml.ElementTree import iterparse

    count = 0
    depth = 0
    try:
        with target.open("w", encoding="utf-8") as out:
            for event, elem in iterparse(str(source), events=("start", "end"), forbid_dtd=False):
                if event == "start":
                    depth += 1
                    continue
                depth -= 1
                if depth != 1:
                    continue
                record: dict[str, str | None] = dict(elem.attrib)
                for child in elem:
                    record[child.tag] = child.text.strip() if child.text and child.text.strip() else None
                if not len(elem) and not elem.attrib:
                    record[elem.tag] = (elem.text or "").strip() or None
                out.write(json.dumps(record) + "\n")
                count += 1
                elem.clear()
    except (EntitiesForbidden, ExternalReferenceForbidden, DTDForbidden) as exc:
        raise ConversionError(f"{source.name}: XML entities are forbidden ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - ParseError and friends
        raise ConversionError(f"{source.name}: not well-formed XML ({exc})") from None
    return count


def _rules_sql(rules: list[Rule]) -> str:
    if not rules:
        return ""
    cases = ", ".join(f"CASE WHEN ({r.sql}) THEN '{r.name}' END" for r in rules)
    return f", list_filter([{cases}], lambda x: x IS NOT NULL) AS __rules"


def _check_rules(
    conn: duckdb.DuckDBPyConnection, source: Path, kind: str, path: Path, rules: list[Rule], required: tuple[str, ...]
) -> None:
    """Fail before the pass, naming the rule file and rule, if the file cannot be validated.

    Both checks only bind the query (LIMIT 0): DuckDB samples the file, it does not scan it.
    """
    columns = {row[0] for row in conn.execute(f"DESCRIBE SELECT * FROM {_reader_sql(kind)}", [str(path)]).fetchall()}
    origin = rules[0].source.split(": rule")[0] if rules else "rule set"
    missing = [c for c in required if c not in columns]
    if missing:
        raise ConversionError(f"{source.name}: {origin} needs column(s) {', '.join(missing)}, which the file lacks")
    if not rules:
        return
    try:  # all rules bound at once; only a failure pays for finding which rule it was
        conn.execute(f"SELECT {', '.join(f'({r.sql})' for r in rules)} FROM {_reader_sql(kind)} LIMIT 0", [str(path)])
        return
    except duckdb.Error:
        pass
    for rule in rules:
        try:
            conn.execute(f"SELECT ({rule.sql}) FROM {_reader_sql(kind)} LIMIT 0", [str(path)])
        except duckdb.Error as exc:
            raise ConversionError(f"{source.name}: {rule.source or rule.name}: {_clean(exc)}") from None


def _batches(
    source: Path,
    kind: str,
    work: Path,
    rules: list[Rule],
    required_columns: tuple[str, ...],
    memory_limit: str,
    threads: int | None,
) -> tuple[duckdb.DuckDBPyConnection, pa.RecordBatchReader]:
    conn = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(work / ".duckdb_tmp")})
    conn.execute("SET enable_progress_bar = false")
    conn.execute(f"SET threads = {threads or min(4, os.cpu_count() or 1)}")
    conn.execute("SET preserve_insertion_order = true")
    path = source
    if kind == "xml":
        path = work / ".xml.jsonl"
        if xml_to_jsonl(source, path) == 0:
            path.write_text("")
    try:
        if rules or required_columns:
            _check_rules(conn, source, kind, path, rules, required_columns)
        # The relation API streams; an execute() result would be copied whole into Arrow.
        relation = conn.sql(f"SELECT *{_rules_sql(rules)} FROM {_reader_sql(kind)}", params=[str(path)])
        return conn, relation.to_arrow_reader(BATCH_ROWS)
    except duckdb.Error as exc:
        conn.close()
        raise ConversionError(f"{source.name}: {_clean(exc)}") from None
    except ConversionError:
        conn.close()
        raise


def _clean(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:600]


def _slices(reader: pa.RecordBatchReader, chunk_size: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(chunk index, piece) in source order, pieces cut exactly at chunk boundaries."""
    offset = 0
    for batch in reader:
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

    def __init__(self, out_dir: Path, index: int, schema: pa.Schema, compression: str, with_rules: bool) -> None:
        self.index = index
        self.path = out_dir / f"part-{index:05d}.parquet"
        self.rejected_path = out_dir / "_rejected" / f"part-{index:05d}.parquet" if with_rules else None
        self.data_schema = schema.remove(schema.get_field_index("__rules")) if with_rules else schema
        self.writer = pq.ParquetWriter(self.path, self.data_schema, compression=compression.lower())
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
                self.rejected_writer = pq.ParquetWriter(self.rejected_path, rejected.schema, compression=self.compression.lower())
            self.rejected_writer.write_table(rejected)

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
) -> ConversionResult:
    """Convert in one pass; chunk i holds source records [i*size, min((i+1)*size, n) - 1]."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = rules or []
    conn, reader = _batches(source, kind, out_dir, rules, required_columns, memory_limit, threads)
    chunks: list[ChunkFile] = []
    current: _ChunkWriter | None = None
    total = 0
    # DuckDB produces the next batch while writer threads encode the previous ones. Each
    # chunk stays on one writer ("lane"), so its records keep their order; neighbouring
    # chunks are encoded in parallel, and at most a few batches are in flight.
    pending: deque[Future] = deque()
    lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"parquet-writer-{i}") for i in range(WRITER_LANES)]

    def close(writer: _ChunkWriter) -> None:
        chunks.append(writer.close(chunk_size))

    try:
        for index, piece in _slices(reader, chunk_size):
            lane = lanes[index % WRITER_LANES]
            if current is None or current.index != index:
                if current is not None:
                    pending.append(lanes[current.index % WRITER_LANES].submit(close, current))
                current = _ChunkWriter(out_dir, index, reader.schema, compression, bool(rules))
            pending.append(lane.submit(current.write, piece))
            total += piece.num_rows
            while len(pending) > 2 * WRITER_LANES:
                pending.popleft().result()
        if current is not None:
            pending.append(lanes[current.index % WRITER_LANES].submit(close, current))
        while pending:
            pending.popleft().result()
        chunks.sort(key=lambda c: c.chunk_index)
        columns = [(f.name, str(f.type)) for f in reader.schema if f.name != "__rules"]
    except duckdb.Error as exc:
        raise ConversionError(f"{source.name}: {_clean(exc)}") from None
    except pa.ArrowInvalid as exc:
        raise ConversionError(f"{source.name}: {_clean(exc)}") from None
    finally:
        for lane in lanes:
            lane.shutdown(wait=True)
        conn.close()
    return ConversionResult(total, chunks, columns, time.perf_counter() - started)
