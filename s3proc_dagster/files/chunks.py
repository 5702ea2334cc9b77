"""Chunks: a file's records cut at chunk boundaries and written as `part-NNNNN.parquet`.

Batches arrive in source order and are cut exactly at chunk boundaries, so chunk i holds
records [i*size, (i+1)*size - 1] whatever the batch size. A rule set's rejected records
are split from the valid ones per batch with Arrow compute and written beside them under
`_rejected/`. Whoever produces the batches (`tabular.py`) knows nothing of Parquet.

pyarrow is imported where a chunk is written, not with the module: the code server
imports ChunkFile for the definitions and never writes a chunk, and pyarrow would cost it
58 MB (the run zygote imports it once for every run).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

WRITER_LANES = 2
RULES_COLUMN = "_rules"
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


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
    """Writes one chunk's valid records (and rejected ones, when rules are on).

    Its Parquet writers are opened by the first `write`, on the chunk's lane: the thread
    that reads DuckDB's batches only cuts them. Opened there, 413 writers of an 819 MB
    CSV took that thread 1.2 s (sampled with py-spy), each batch DuckDB waited for.
    """

    def __init__(
        self, out_dir: Path, index: int, schema: pa.Schema, compression: str, with_rules: bool, dictionary: list[str]
    ) -> None:
        self.index = index
        self.path = out_dir / f"part-{index:05d}.parquet"
        self.rejected_path = out_dir / "_rejected" / f"part-{index:05d}.parquet" if with_rules else None
        self.schema, self.with_rules, self.dictionary = schema, with_rules, dictionary
        self.writer: _Parquet | None = None
        self.rejected_writer: _Parquet | None = None
        self.compression = compression
        self.records = 0
        self.failed = 0
        self.rule_counts: dict[str, int] = {}

    def write(self, piece: pa.RecordBatch) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        self.records += piece.num_rows
        if self.writer is None:
            schema = self.schema.remove(self.schema.get_field_index("__rules")) if self.with_rules else self.schema
            self.writer = _Parquet(self.path, schema, self.compression, self.dictionary)
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
                self.rejected_writer = _Parquet(self.rejected_path, rejected.schema, self.compression)
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
        assert self.writer is not None  # a chunk exists because a piece was written to it
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


class _Parquet:
    """A Parquet writer on a file it opened itself: given a path, pyarrow resolves a
    filesystem for every file it writes."""

    def __init__(self, path: Path, schema: pa.Schema, compression: str, dictionary: list[str] | bool = True) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._file = pa.OSFile(str(path), "wb")
        try:
            self._writer = pq.ParquetWriter(
                self._file, schema, compression=compression.lower(), use_dictionary=dictionary
            )
        except BaseException:
            self._file.close()
            raise

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            self._file.close()


def _dictionary_columns(batch: pa.RecordBatch) -> list[str]:
    """Columns worth dictionary encoding, judged once per file on its first batch.

    Dictionary encoding pays for repeated values (a status, a date) but on a column of
    unique ids it fills a 1 MB dictionary, falls back to plain and leaves a bigger file:
    on the benchmark CSV, dictionary everywhere took 25% longer, 10% more memory and
    wrote 79 MB where this choice writes about 62 MB. One choice for the whole file
    keeps the chunks alike.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

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
    import pyarrow as pa
    import pyarrow.compute as pc

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


def write_chunks(
    batches: Iterator[pa.RecordBatch],
    schema: pa.Schema,
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
    only known to be whole when the source ends). `schema` is the stream's, `__rules`
    included when `with_rules`: the pieces are written as they come.
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
        for index, piece in _slices(batches, chunk_size):
            if current is None or current.index != index:
                if current is not None:
                    pending.append(lanes[current.index % WRITER_LANES].submit(close, current, True))
                if dictionary is None:
                    dictionary = _dictionary_columns(piece)
                    if first_batch is not None:
                        first_batch.append(piece)
                current = _ChunkWriter(out_dir, index, schema, compression, with_rules, dictionary)
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


def clear_chunks(out_dir: Path) -> None:
    """Parts of an earlier, interrupted attempt must not be mistaken for this one's."""
    for stale in [*out_dir.glob("part-*.parquet"), *out_dir.glob("_rejected/part-*.parquet")]:
        stale.unlink()
