"""Lineage columns: where each Parquet row came from, on the row itself.

With a zone's `lineage_columns`, every row carries `_source_file` (the zone-relative path,
or the S3 URI it arrived as), `_source_row` (its record's index in the file, so chunk i's
rows run from its startOffset to its endOffset), `_file_sha256` and `_landed_at`: a
reader joining many files' datasets can still tell rows apart by origin (dlt's
`file_name`, Airbyte's `_ab_source_file_url`). They are appended to each batch of the
one pass, after DuckDB typed the source, so they never change how the source is read.
pyarrow is imported by the methods that build columns, as in `chunks.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

COLUMNS = ("_source_file", "_source_row", "_file_sha256", "_landed_at")


@dataclass(frozen=True)
class Lineage:
    source_file: str
    file_sha256: str
    landed_at: datetime  # the first conversion's: a conversion made again writes the same rows

    @staticmethod
    def clashes(names: list[str]) -> list[str]:
        """The file's own columns named like a lineage column: kept, they would stand twice
        in each part and let a producer forge where a row came from."""
        return [name for name in names if name.lower() in COLUMNS]

    def schema(self, schema: pa.Schema) -> pa.Schema:
        import pyarrow as pa

        for name, kind in zip(
            COLUMNS, (pa.string(), pa.int64(), pa.string(), pa.timestamp("us", tz="UTC")), strict=True
        ):
            schema = schema.append(pa.field(name, kind, nullable=False))
        return schema

    def apply(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Each batch with the four columns; `_source_row` counts records from 0 across batches."""
        import pyarrow as pa

        offset = 0
        for batch in batches:
            n = batch.num_rows
            yield pa.RecordBatch.from_arrays(
                [
                    *batch.columns,
                    pa.array([self.source_file] * n, pa.string()),
                    pa.array(range(offset, offset + n), pa.int64()),
                    pa.array([self.file_sha256] * n, pa.string()),
                    pa.array([self.landed_at] * n, pa.timestamp("us", tz="UTC")),
                ],
                schema=self.schema(batch.schema),
            )
            offset += n
