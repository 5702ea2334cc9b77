"""The product's enums and records, named as the specification names them.

Python attributes are snake_case; `to_document()` gives the stored camelCase names
(`fileId`, `processingStats`), which is what MongoDB stores and what `s3proc status
--json` prints. Statuses are lower case in SQLite's `file_progress` table and upper case
in the MongoDB documents, as the specification has them: the enum keeps the lower-case
values and `storage_name` gives the upper-case spelling.
"""

from __future__ import annotations

import enum
import hashlib
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator
from pydantic.alias_generators import to_camel


def utcnow() -> datetime:
    return datetime.now(UTC)


class FileType(str, enum.Enum):
    ARCHIVE = "archive"  # .zip, .tar, .gz, .tar.gz, .tgz
    DATABASE = "database"  # .csv, .tsv, .json, .xml, .jsonl
    REGULAR = "regular"  # all other files

    @property
    def meaning(self) -> str:
        """What the specification's word means for the file, where a user reads it (the
        progress line, the asset's metadata): "database" for a CSV puzzled users."""
        return _FILE_TYPE_MEANINGS[self]


_FILE_TYPE_MEANINGS = {
    FileType.ARCHIVE: "its entries processed as files of their own",
    FileType.DATABASE: "tabular, converted to Parquet chunks",
    FileType.REGULAR: "not tabular, copied to S3 as one object",
}


class ProcessingStatus(str, enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def storage_name(self) -> str:
        """The FileStatus document's spelling (`IN_PROGRESS`), used by the MongoDB documents."""
        return self.name

    @classmethod
    def parse(cls, value: str) -> ProcessingStatus:
        return cls(value.lower())


class ProcessingStep(str, enum.Enum):
    CHECKSUM_CALCULATION = "checksum_calculation"
    TYPE_DETECTION = "type_detection"
    ARCHIVE_EXTRACTION = "archive_extraction"
    PARQUET_CONVERSION = "parquet_conversion"
    S3_UPLOAD = "streaming"
    INTEGRITY_VERIFICATION = "integrity_verification"
    PROGRESS_UPDATE = "progress_update"


class UploadStatus(str, enum.Enum):
    PENDING = "pending"
    UPLOADING = "uploading"
    VERIFYING = "verifying"
    COMPLETED = "completed"
    FAILED = "failed"


class RequestStatus(str, enum.Enum):
    """The image processing design's request lifecycle: pending -> processing -> completed | failed."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class Document(BaseModel):
    """A stored record: snake_case in Python, camelCase in storage and JSON."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, use_enum_values=False)

    @field_validator("*", mode="after")
    @classmethod
    def _aware(cls, value: Any) -> Any:
        """Stores hand back naive datetimes (BSON, some servers): they are all UTC."""
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def to_document(self) -> dict[str, Any]:
        """The record as stored and printed: camelCase names, ISO datetimes, enum values."""
        return self.model_dump(by_alias=True, mode="json")


def success_rate(successful: int, failed: int) -> float:
    """The FileStatus document's successRate: percent of processed records that passed (100 when none yet)."""
    total = successful + failed
    return round(successful / total * 100, 2) if total else 100.0


class ChunkProcessingStats(Document):
    successful_records: int = 0
    failed_records: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def success_rate(self) -> float:
        return success_rate(self.successful_records, self.failed_records)


class FileProcessingStats(Document):
    """The FileStatus document's processingStats; the counters always equal the chunk records."""

    completed_chunks: int = 0
    failed_chunks: int = 0
    in_progress_chunks: int = 0
    pending_chunks: int = 0
    successful_records: int = 0
    failed_records: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def success_rate(self) -> float:
        return success_rate(self.successful_records, self.failed_records)


def empty_error_summary() -> dict[str, dict[str, int]]:
    return {"validation": {}, "processing": {}}


# An archive entry's metadata names its archive's fileId under this key: the product's own,
# so a producer's metadata may not use it (sources/metadata.py refuses it).
ARCHIVE_FILE_ID = "archiveFileId"


class FileStatus(Document):
    """One file version's lifecycle: the data model's ProgressRecord joined with the FileStatus document.

    `source_bucket`/`source_key` are the object the file came from (set when it arrived
    in S3 incoming; the document's `s3Bucket`/`s3Key`); `output_key` is where the result
    was written (the ProgressRecord's `s3_key`), required for COMPLETED. Every other
    `s3_key` in the code is an output object: a chunk's, a rejected part's, an upload's.
    """

    file_id: str
    file_path: str
    file_name: str
    status: ProcessingStatus = ProcessingStatus.PENDING
    file_type: FileType | None = None
    content_type: str | None = None
    file_size: int | None = None
    processed_bytes: int | None = None
    checksum: str | None = None
    # Stored under the FileStatus document's own names, which call the source object s3Bucket/s3Key.
    source_bucket: str | None = Field(default=None, alias="s3Bucket")
    source_key: str | None = Field(default=None, alias="s3Key")
    output_key: str | None = None
    estimated_record_count: int | None = None
    chunk_size: int | None = None
    chunking_strategy: str = "FIXED_COUNT"
    total_chunks: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    processing_started_at: datetime | None = None
    completed_at: datetime | None = None
    last_updated_at: datetime = Field(default_factory=utcnow)
    error_details: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    processing_stats: FileProcessingStats = Field(default_factory=FileProcessingStats)
    error_summary: dict[str, dict[str, int]] = Field(default_factory=empty_error_summary)
    # The Dagster run that holds the file while IN_PROGRESS (and the last one that did):
    # a claim is only as good as that run's liveness, so a killed run never blocks a file.
    run_id: str | None = None
    # A zone's after_success on the original once the version is COMPLETED: `delete (pending)`
    # or `move:<where> (pending)` with the COMPLETED write, then what was done (`deleted`,
    # `moved to <where>`, or why not): a crash between the two is finished by recovery.
    after_success: str | None = None


class RejectedPart(Document):
    """Where a chunk's records that failed validation went: its own Parquet object."""

    s3_key: str
    size_bytes: int
    sha256: str
    records: int


class ChunkStatus(Document):
    """The specification's ChunkStatus document: records [start_offset, end_offset] of one file, one Parquet object."""

    chunk_id: str
    file_id: str
    chunk_index: int = Field(ge=0)
    start_offset: int = Field(ge=0)
    end_offset: int
    record_count: int = Field(ge=0)
    status: ProcessingStatus = ProcessingStatus.PENDING
    processing_thread: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration: float | None = None
    retry_count: int = 0
    error_details: str | None = None
    processing_stats: ChunkProcessingStats = Field(default_factory=ChunkProcessingStats)
    error_summary: dict[str, dict[str, int]] = Field(default_factory=empty_error_summary)
    s3_key: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    # The file version (its SHA-256) this chunk belongs to: a new version never inherits
    # an old version's chunk state, even when the offsets are the same.
    version: str | None = None
    rejected: RejectedPart | None = None


class S3UploadTask(Document):
    """One multipart upload in flight: `upload_id` is kept so that a retried, re-executed
    or restarted upload resumes from the parts S3 already has, and so that one given up
    can be aborted. A task belongs to one content (`checksum`): other bytes for the same
    key never resume it."""

    id: str
    source_file_path: str
    s3_key: str
    bucket: str
    content_type: str = "application/octet-stream"
    size: int | None = None
    uploaded_bytes: int = 0
    upload_id: str | None = None
    etag: str | None = None
    checksum: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    status: UploadStatus = UploadStatus.PENDING
    error: str | None = None
    file_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Request(Document):
    """The image processing design's Requests document, plus what a user needs to act on it."""

    request_id: str
    status: RequestStatus = RequestStatus.PENDING
    file_name: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    errors: list[str] = Field(default_factory=list)
    output_csv_url: str | None = None


class RequestData(Document):
    """The image processing design's RequestData document: one CSV row and its images, in input order."""

    request_id: str
    serial_number: int
    product_name: str
    input_image_urls: list[str]
    output_image_urls: list[str | None] = Field(default_factory=list)
    errors: list[str | None] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    completed_at: datetime | None = None


def chunk_id(file_id: str, chunk_index: int) -> str:
    return f"{file_id}-chunk-{chunk_index}"


_SLUG = re.compile(r"[^a-z0-9]+")


def make_file_id(relative_path: str, zone: str = "") -> str:
    """`<name>-<hash>`: readable like the specification's example, unique and stable per source path.

    It depends only on the path below the watched directory (or below the S3 incoming
    prefix), so a file gets the same id whether it came by disk or by S3. The slug is for
    reading; the 64-bit hash of the exact path is what keeps ids apart (`a/b.csv`,
    `a_b.csv`, `a//b.csv` all differ), with a first collision expected only after
    billions of paths.
    """
    if zone:  # a declared landing zone's files: the same path in two zones is two files
        relative_path = f"{zone}:{relative_path}"
    name = relative_path.rsplit("/", 1)[-1]
    stem = relative_path.rsplit(".", 1)[0] if "." in name else relative_path
    slug = _SLUG.sub("-", stem.lower()).strip("-")[:80] or "file"
    digest = hashlib.sha256(relative_path.encode()).hexdigest()[:16]
    return f"{slug}-{digest}"
