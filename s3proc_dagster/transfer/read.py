"""Reading a file's output back: a dataset's current version, found through its manifest.

A dataset is read through its committed `_manifest.json` only, never by listing or
globbing its folder: while a new version is committed the folder holds two versions for
as long as the old one takes to delete, and only the manifest says which parts are one
version. The parts are read through pyarrow's S3 filesystem (`client.filesystem_for`),
which fetches the footer and then one row group at a time, and the conversion writes a
row group per Arrow batch of at most `files.tabular.BATCH_ROWS` records: reading a
dataset of any size holds one row group in memory, never a whole part or the dataset.
Measured with `s3proc read` to CSV: 2,000,000 records (3 parts, 39 MB of Parquet) peak at
260 MB, 6,000,000 (9 parts, 117 MB) at 264 MB; 163 MB of either is the imports.

Naming follows the store: a file is named as `s3proc status` names it (`FileRef`) and is
read only once COMPLETED; a dataset or object may also be named by its own key or
`s3://` URI, and is then read as S3 has it committed, whatever the store says.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from s3proc_dagster.errors import ChecksumMismatch, NotReadable, ObjectUnreadable, RecordNotFound, s3_error_code
from s3proc_dagster.models import FileStatus, FileType, ProcessingStatus
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR, FileRef
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.transfer.manifest import MANIFEST_NAME, Manifest, ManifestPart, read_manifest
from s3proc_dagster.transfer.verify import head

COPY_BYTES = 8 * 1024 * 1024  # a non-tabular object streams to its file in pieces this big


@dataclass(frozen=True)
class Output:
    """One file's output in S3: a dataset with its committed manifest, or one object."""

    bucket: str
    key: str
    manifest: Manifest | None = None
    sha256: str | None = None  # an object's `x-sha256`, checked as its bytes stream

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" + ("/" if self.manifest else "")

    def parts(self, rejected: bool = False) -> list[ManifestPart]:
        """The current version's Parquet parts in chunk order (or its `_rejected/` parts)."""
        if self.manifest is None:
            return []
        listed = self.manifest.rejected if rejected else self.manifest.chunks
        return sorted(listed, key=lambda p: p.chunk_index)

    def part_uris(self, rejected: bool = False) -> list[str]:
        if self.manifest is None:
            return [self.uri]
        return [f"s3://{self.bucket}/{p.key}" for p in self.parts(rejected)]


def key_in_bucket(arg: str, bucket: str) -> str | None:
    """The key `arg` spells in `bucket`: `s3://<bucket>/<key>`, or `arg` itself when it is
    neither a URI nor an absolute path. A trailing `/` or `/_manifest.json` names the dataset."""
    if arg.startswith("s3://"):
        named, _, key = arg.removeprefix("s3://").partition("/")
        if named != bucket:
            return None
    elif "://" in arg or Path(arg).is_absolute():
        return None
    else:
        key = arg
    key = key.strip("/")
    if key == MANIFEST_NAME or key.endswith("/" + MANIFEST_NAME):
        key = key.removesuffix(MANIFEST_NAME).rstrip("/")
    return key or None


def locate(arg: str, ref: FileRef, files: Sequence[FileStatus], client: Any, bucket: str) -> Output:
    """What `arg` names: a recorded file's output, else a dataset or object by its key.

    A file named as the store knows it must be COMPLETED: while a new version is being
    processed its dataset still holds the previous one, which is not the file the user
    named (the error says how to read it anyway).
    """
    matched = [f for f in files if ref.matches(f)]
    if len(matched) > 1:
        names = ", ".join(sorted(f.file_path for f in matched))
        raise NotReadable(f"{arg} names {len(matched)} files ({names}): name one by its absolute path or fileId")
    if matched:
        return output_of(matched[0], files, client, bucket)
    key = key_in_bucket(arg, bucket)
    if key is None:
        raise RecordNotFound(f"no file matches {arg}")
    found = committed(client, bucket, key)
    if found is not None:
        return found
    producing = [f for f in files if f.output_key == key]
    if producing:
        return output_of(producing[0], files, client, bucket)
    raise RecordNotFound(f"no file matches {arg}, and there is no dataset or file at s3://{bucket}/{key}")


def output_of(record: FileStatus, files: Sequence[FileStatus], client: Any, bucket: str) -> Output:
    """A recorded file's output, once it is COMPLETED and its output is in S3."""
    if record.status is not ProcessingStatus.COMPLETED:
        raise NotReadable(_not_completed(record, client, bucket))
    if record.file_type is FileType.ARCHIVE:
        entries = sorted(f.file_path for f in files if f.file_path.startswith(record.file_path + ENTRY_SEPARATOR))
        example = f", e.g. '{entries[0]}'" if entries else ""
        raise NotReadable(
            f"{record.file_path} is an archive, and its entries are files of their own: "
            f"read one as ARCHIVE{ENTRY_SEPARATOR}ENTRY{example}"
        )
    key = record.output_key or ""
    found = committed(client, bucket, key) if key else None
    if found is not None:
        return found
    if record.file_type is FileType.DATABASE:
        raise NotReadable(
            f"{record.file_path} is COMPLETED but s3://{bucket}/{key}/ has no readable {MANIFEST_NAME}: "
            "its dataset was deleted or overwritten; `s3proc retry --force` processes the file again"
        )
    raise NotReadable(f"{record.file_path} is COMPLETED but s3://{bucket}/{key} is not in S3 any more")


def _not_completed(record: FileStatus, client: Any, bucket: str) -> str:
    """Its status, why it failed, and where an earlier committed version can still be read."""
    name = record.status.name
    if record.status is ProcessingStatus.FAILED:
        text = f"{record.file_path} is FAILED, not COMPLETED: {record.error_details or 'no reason recorded'}"
    else:
        text = f"{record.file_path} is {name}, not COMPLETED yet (`s3proc status` shows how far it is)"
    earlier = committed(client, bucket, record.output_key) if record.output_key else None
    if earlier is not None:
        text += f"; the version committed before it is read with `s3proc read {earlier.uri}`"
    return text


def committed(client: Any, bucket: str, key: str) -> Output | None:
    """The dataset whose manifest is at `key`, else the object at `key` that the product
    wrote (`x-completed`); None when S3 has neither."""
    try:
        manifest = read_manifest(client, bucket, key)
    except Exception as exc:
        code = s3_error_code(exc) or type(exc).__name__
        raise ObjectUnreadable(f"s3://{bucket}/{join_key(key, MANIFEST_NAME)}: cannot be read ({code})") from None
    if manifest is not None:
        return Output(bucket, key, manifest)
    found = head(client, bucket, key)
    metadata = (found or {}).get("Metadata", {})
    if metadata.get("x-completed") == "true":
        return Output(bucket, key, sha256=metadata.get("x-sha256"))
    return None


def read_records(fs: Any, output: Output, rejected: bool = False, limit: int | None = None) -> pa.RecordBatchReader:
    """The records of the dataset's current version (or its rejected ones), in chunk order,
    at most `limit` of them. The schema is the first part's: every part of a version has
    the same (the conversion infers the types once per file). No part, no column."""
    parts = output.parts(rejected)
    if not parts:
        return pa.RecordBatchReader.from_batches(pa.schema([]), iter(()))
    with _open_part(fs, output.bucket, parts[0]) as first:
        schema = first.schema_arrow

    def batches() -> Iterator[pa.RecordBatch]:
        remaining = limit
        for part in parts:
            if remaining == 0:
                return
            with _open_part(fs, output.bucket, part) as parquet:
                for batch in _guarded(part, output.bucket, parquet.iter_batches()):
                    kept = batch if remaining is None else batch.slice(0, remaining)
                    if remaining is not None:
                        remaining -= kept.num_rows
                    yield kept
                    if remaining == 0:
                        return

    return pa.RecordBatchReader.from_batches(schema, batches())


@contextlib.contextmanager
def _open_part(fs: Any, bucket: str, part: ManifestPart) -> Iterator[pq.ParquetFile]:
    uri = f"s3://{bucket}/{part.key}"
    try:
        source = fs.open_input_file(f"{bucket}/{part.key}")
    except FileNotFoundError:
        # the manifest was read, then a newer version was committed and this one deleted
        raise ObjectUnreadable(
            f"{uri}: gone while the dataset was read (a newer version was committed meanwhile): run the command again"
        ) from None
    except OSError as exc:
        raise ObjectUnreadable(f"{uri}: cannot be read ({exc})") from None
    with source:
        if source.size() != part.bytes:
            raise ChecksumMismatch(f"{uri}: {source.size()} bytes in S3, the manifest lists {part.bytes}")
        yield pq.ParquetFile(source)


def _guarded(part: ManifestPart, bucket: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """A network fault mid-part surfaces as the part's URI and the cause, not a traceback."""
    try:
        yield from batches
    except OSError as exc:
        raise ObjectUnreadable(f"s3://{bucket}/{part.key}: cannot be read ({exc})") from None


def write_csv(records: pa.RecordBatchReader, sink: BinaryIO) -> int:
    """A header line, then the records; returns how many. CSV has no nesting, so a struct,
    list or map value is written as its JSON text (JSON lines and Parquet keep it as it is)."""
    if not records.schema:
        return 0
    written = 0
    for batch in records:
        _csv_batch(batch, sink, header=written == 0 and batch.num_rows > 0)
        written += batch.num_rows
    if written == 0:  # `--limit 0`, or an empty version: the header still says what the columns are
        _csv_batch(pa.RecordBatch.from_pylist([], schema=records.schema), sink, header=True)
    return written


def _csv_batch(batch: pa.RecordBatch, sink: BinaryIO, header: bool) -> None:
    if batch.num_rows == 0 and not header:
        return
    columns = [
        pa.array([None if v is None else _json_text(v) for v in column.to_pylist()], pa.string())
        if pa.types.is_nested(column.type)
        else column
        for column in batch.columns
    ]
    out = io.BytesIO()
    pa_csv.write_csv(
        pa.RecordBatch.from_arrays(columns, names=batch.schema.names), out, pa_csv.WriteOptions(include_header=header)
    )
    sink.write(out.getvalue())


def write_jsonl(records: pa.RecordBatchReader, sink: BinaryIO) -> int:
    """One JSON object a record, keyed by column name; returns how many."""
    written = 0
    for batch in records:
        rows = batch.to_pylist()
        sink.write("".join(_json_text(row) + "\n" for row in rows).encode())
        written += len(rows)
    return written


def write_parquet(records: pa.RecordBatchReader, path: Path) -> int:
    """One Parquet file holding the records, ZSTD-compressed; returns how many."""
    written = 0
    with pq.ParquetWriter(path, records.schema, compression="zstd") as writer:
        for batch in records:
            writer.write_batch(batch)
            written += batch.num_rows
    return written


def _json_text(value: Any) -> str:
    return json.dumps(value, default=_json_value, ensure_ascii=False)


def _json_value(value: Any) -> Any:
    """JSON has no dates, decimals or bytes: ISO 8601 text, the decimal's digits, base64."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def copy_object(fs: Any, output: Output, sink: BinaryIO) -> int:
    """A non-tabular file's bytes, checked against the `x-sha256` it was uploaded with as
    they stream; returns how many."""
    digest = hashlib.sha256()
    copied = 0
    try:
        with fs.open_input_stream(f"{output.bucket}/{output.key}") as source:
            while piece := source.read(COPY_BYTES):
                digest.update(piece)
                sink.write(piece)
                copied += len(piece)
    except FileNotFoundError:
        raise ObjectUnreadable(f"{output.uri}: not in S3 any more") from None
    except OSError as exc:
        raise ObjectUnreadable(f"{output.uri}: cannot be read ({exc})") from None
    if output.sha256 and digest.hexdigest() != output.sha256:
        raise ChecksumMismatch(
            f"{output.uri}: its bytes have SHA-256 {digest.hexdigest()}, uploaded as {output.sha256}"
        )
    return copied


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` that becomes `path` only when the block succeeds, so
    a failed read never leaves a partial file under the name asked for."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
