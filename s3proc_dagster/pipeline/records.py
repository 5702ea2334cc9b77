"""What the steps hand each other: small records that point into the staging area.

They are a step's outputs, kept between steps (as JSON, `defs/step_outputs.py`) so that
"Re-execute from failure" reloads them; a node that lacks the files they point to derives
them again (`pipeline.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from s3proc_dagster.files.chunks import ChunkFile
from s3proc_dagster.files.detect import is_tabular
from s3proc_dagster.files.tabular import DUCKDB_NULL_STRINGS
from s3proc_dagster.models import FileType, chunk_id
from s3proc_dagster.settings import Configuration
from s3proc_dagster.sources.resolve import Source
from s3proc_dagster.stores.base import ClaimOutcome
from s3proc_dagster.transfer import manifest as manifests


@dataclass(frozen=True)
class FileVersion:
    """Step 1's result: the snapshot in staging, its checksum, and what to do with it.

    `outcome` is CLAIMED (this run processes it), UNCHANGED (this version is already
    COMPLETED) or BUSY (another live run, `holder`, is processing this same version).
    """

    file_id: str
    source: Source
    snapshot_path: str
    sha256: str
    size: int
    outcome: ClaimOutcome = ClaimOutcome.CLAIMED
    holder: str | None = None

    @property
    def needed(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED


@dataclass(frozen=True)
class WorkItem:
    """One thing to upload: the file itself, or one entry of an archive (its own record)."""

    file_id: str
    relative_path: str  # the S3 layout below the prefix: rel path, archive name as a folder
    local_path: str
    kind: str
    file_type: FileType
    content_type: str
    version: str = ""  # the record's checksum: the file's SHA-256, or `<archive sha>:<entry path>`


@dataclass(frozen=True)
class ConversionRecipe:
    """Everything a conversion depends on, kept with its result so that a node without the
    chunk files converts again to the same chunks: the same boundaries, and the same
    validation (the rules' date is the one the first conversion used, not today's)."""

    chunk_size: int
    compression: str
    rules_dir: Path | None = None
    as_of: date | None = None
    csv_null_strings: tuple[str, ...] = DUCKDB_NULL_STRINGS
    lineage_columns: bool = False  # a zone's `lineage_columns` (files.lineage)
    landed_at: datetime | None = None  # the first conversion's time: its lineage's `_landed_at`

    @classmethod
    def of(cls, cfg: Configuration) -> ConversionRecipe:
        """The recipe the settings give (CHUNK_SIZE, PARQUET_COMPRESSION, the rule sets...)."""
        processing = cfg.processing
        return cls(
            processing.chunk_size,
            processing.parquet_compression,
            processing.validation_rules_dir,
            processing.validation_as_of,
            tuple(processing.csv_null_strings),
            cfg.zone.lineage_columns,
        )


@dataclass(frozen=True)
class PreparedItem:
    """A work item ready to upload: a Parquet dataset (chunks) or one object as it is."""

    item: WorkItem
    key: str  # dataset prefix for tabular items, object key otherwise
    record_count: int | None = None
    compression: str | None = None
    chunks: tuple[ChunkFile, ...] = ()
    skipped_rules: dict[str, str] = field(default_factory=dict)  # rule -> why it could not run
    recipe: ConversionRecipe | None = None  # how `chunks` were made, to make them again
    sent_ahead: frozenset[int] = frozenset()  # chunks that landed during the conversion
    landed_in_run: str = ""  # the run whose conversion landed them
    numbers_as_text: dict[str, list[str]] = field(default_factory=dict)  # column -> the words that made it text
    columns: tuple[tuple[str, str], ...] = ()  # (name, DuckDB type) of a dataset's columns
    schema_drift: str = ""  # how the columns differ from the zone's last landing, when they do

    @property
    def is_tabular(self) -> bool:
        """A Parquet dataset of chunks, rather than one object as it is."""
        return is_tabular(self.item.kind)

    def part_key(self, chunk: ChunkFile, rejected: bool = False) -> str:
        return manifests.part_key(self.key, self.item.version, chunk.chunk_index, rejected)

    def chunk_id(self, chunk: ChunkFile) -> str:
        return chunk_id(self.item.file_id, chunk.chunk_index)


@dataclass(frozen=True)
class UploadedObject:
    """One object now in S3 (a chunk or a whole file), for the run's materializations."""

    file_id: str
    relative_path: str
    key: str
    size: int
    sha256: str
    duration_s: float
    reused: bool  # already in S3 and verified: not sent again
    ahead: bool = False  # landed during this run's conversion, which reported it
    chunk: ChunkFile | None = None
    compression: str | None = None
