"""What the UI shows of a file: a materialization per file version, per chunk of a big one, and log lines.

Every processed file is an asset keyed by the bucket prefix and its relative path, so the
catalog's folders are the watched directory's folders. A file's version, once COMPLETED,
is one materialization holding its chunks as a table (index, rows, offsets, bytes, key);
a dataset of several chunks also has one materialization per chunk as it lands (rows,
bytes, S3 URI, SHA-256, offsets), so a big file's progress shows while it uploads. A
file of one chunk, or one that is not tabular, has no second event saying the same: each
row of Dagster's event log costs 10-18 ms on SQLite, as much as a small file's work. A
file that fails for good is an observation of its asset, FAILED with the reason.
"""

import dagster as dg

from s3proc_dagster.models import FileStatus
from s3proc_dagster.names import KIND_TAG
from s3proc_dagster.pipeline import FileVersion, GaveUp, PreparedItem, UploadedObject
from s3proc_dagster.pipeline.batch import FileInRun
from s3proc_dagster.stores.base import ClaimOutcome


def asset_key_for(prefix: str, relative_path: str) -> dg.AssetKey:
    """Stable per-file asset key: the bucket prefix and relative path, folder by folder,
    spelled exactly (Dagster takes any text in a key's parts), so two files never share
    a key: `promo.csv` and `promo_csv` stay apart."""
    return dg.AssetKey([p for p in f"{prefix}/{relative_path}".split("/") if p])


def object_landed(obj: UploadedObject, prefix: str, uri: str) -> dg.AssetMaterialization:
    metadata: dict = {
        "s3_uri": dg.MetadataValue.url(uri),
        "bytes": obj.size,
        "sha256": obj.sha256,
        "duration_s": round(obj.duration_s, 3),
        "fileId": obj.file_id,
        "reused": obj.reused,
    }
    if obj.chunk is not None:
        metadata.update(
            chunk_index=obj.chunk.chunk_index,
            rows=obj.chunk.record_count,
            start_offset=obj.chunk.start_offset,
            end_offset=obj.chunk.end_offset,
            compression=obj.compression or "",
        )
    label = f"chunk {obj.chunk.chunk_index}" if obj.chunk is not None else "object"
    return dg.AssetMaterialization(
        asset_key=asset_key_for(prefix, obj.relative_path),
        description=f"{label} of {obj.relative_path}",
        metadata=metadata,
        tags={KIND_TAG: "chunk" if obj.chunk is not None else "object"},
    )


def shows_chunks(item: PreparedItem) -> bool:
    """Whether the item's chunks get materializations of their own: a dataset of several (module docstring)."""
    return item.is_tabular and len(item.chunks) > 1


def chunk_table(item: PreparedItem) -> dg.TableMetadataValue:
    """The version's chunks as the catalog lists them: which records each holds, where."""
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "chunk": c.chunk_index,
                    "rows": c.record_count,
                    "first_record": c.start_offset,
                    "last_record": c.end_offset,
                    "rejected": c.failed_records,
                    "bytes": c.size_bytes,
                    "key": item.part_key(c),
                }
            )
            for c in item.chunks
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("chunk", "int"),
                dg.TableColumn("rows", "int"),
                dg.TableColumn("first_record", "int"),
                dg.TableColumn("last_record", "int"),
                dg.TableColumn("rejected", "int"),
                dg.TableColumn("bytes", "int"),
                dg.TableColumn("key", "string"),
            ]
        ),
    )


def file_completed(
    item: PreparedItem, version: FileVersion, record: FileStatus, prefix: str, uri: str
) -> dg.AssetMaterialization:
    metadata: dict = {
        "s3_uri": dg.MetadataValue.url(uri),
        "fileId": record.file_id,
        "status": record.status.name,
        "rows": item.record_count or 0,
        "chunks": len(item.chunks),
        "bytes": record.processed_bytes or 0,
        "sha256": version.sha256,
        "success_rate": record.processing_stats.success_rate,
        "compression": item.compression or "",
        "file_type": item.item.file_type.value,
    }
    if item.is_tabular:
        metadata["chunk_list"] = chunk_table(item)
    if version.source.metadata:
        metadata["file_metadata"] = version.source.metadata
    if item.numbers_as_text:
        metadata["text_columns_of_numbers"] = "; ".join(
            f"{column}: numbers but for {', '.join(repr(w) for w in words)}"
            for column, words in item.numbers_as_text.items()
        ) + (
            f". These columns landed as text; CSV_NULL_STRINGS={','.join(sorted({w for ws in item.numbers_as_text.values() for w in ws}))},"
            " reads those words as NULL and the columns as numbers"
        )
    if item.skipped_rules:
        metadata["skipped_rules"] = "; ".join(f"{rule} ({why})" for rule, why in item.skipped_rules.items())
    return dg.AssetMaterialization(
        asset_key=asset_key_for(prefix, item.item.relative_path),
        description=f"{item.item.relative_path} completed",
        metadata=metadata,
        tags={KIND_TAG: "file"},
    )


def file_failed(prefix: str, file: FileInRun, reason: str, gave_up: GaveUp) -> dg.AssetObservation:
    """A file that failed for good, on its asset: the catalog shows it with its reason."""
    relative = file.version.source.relative_path if file.version else (file.relative_path or file.path)
    metadata: dict = {"status": "FAILED", "reason": reason, "fileIds": ", ".join(gave_up.failed)}
    if gave_up.parked:
        metadata["parked_at"] = str(gave_up.parked)
    elif gave_up.park_error:
        metadata["not_parked"] = gave_up.park_error
    return dg.AssetObservation(
        asset_key=asset_key_for(prefix, relative),
        description=f"{relative} FAILED: {reason}",
        metadata=metadata,
        tags={KIND_TAG: "failure"},
    )


def skipped(version: FileVersion) -> str:
    rel, sha = version.source.relative_path, version.sha256[:12]
    if version.outcome is ClaimOutcome.BUSY:
        return f"{rel}: run {version.holder} is already processing this version (sha256 {sha}); this run skips it"
    return f"{rel}: unchanged (sha256 {sha}), skipped"


def conversion_summary(prepared: list[PreparedItem]) -> list[str]:
    """What the conversion's own line (`pipeline._convert`: records, chunks, time) leaves out:
    the records validation rejected, per dataset."""
    lines = []
    for item in prepared:
        failed = sum(c.failed_records for c in item.chunks)
        if item.is_tabular and failed:
            lines.append(f"{item.item.relative_path}: {failed} of {item.record_count} records rejected by validation")
    return lines


def gave_up_message(relative_path: str, step: str, message: str, gave_up: GaveUp) -> str:
    if not gave_up.failed:
        return f"{relative_path}: this run holds no file to mark FAILED ({message})"
    where = (
        f"; moved to {gave_up.parked}" if gave_up.parked else (f"; {gave_up.park_error}" if gave_up.park_error else "")
    )
    return f"{relative_path}: FAILED at {step}: {message}{where}"
