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

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from s3proc_dagster.models import FileStatus
from s3proc_dagster.names import KIND_TAG, ZONES_KEY
from s3proc_dagster.pipeline import FileVersion, GaveUp, PreparedItem, UploadedObject
from s3proc_dagster.pipeline.batch import FileInRun
from s3proc_dagster.settings import Configuration
from s3proc_dagster.stores.base import ClaimOutcome

LANDED_CHECK = "landed"  # per partition: the file's latest version landed, or why it did not
SCHEMA_CHECK = "schema_drift"  # per partition: the file's columns against the zone's last landing


def asset_key_for(prefix: str, relative_path: str) -> dg.AssetKey:
    """Stable per-file asset key of the default zone: the bucket prefix and relative path,
    folder by folder, spelled exactly (Dagster takes any text in a key's parts), so two
    files never share a key: `promo.csv` and `promo_csv` stay apart."""
    return dg.AssetKey([p for p in f"{prefix}/{relative_path}".split("/") if p])


def zone_asset_key(zone: str) -> dg.AssetKey:
    return dg.AssetKey([ZONES_KEY, zone])


def zone_partitions(zone: str) -> str:
    """The name of a zone's DynamicPartitionsDefinition: one partition per file path."""
    return f"s3proc_zone_{zone}"


@dataclass(frozen=True)
class Catalog:
    """Where a file's events go: its own asset key in the default zone (as before zones),
    its zone's declared asset, partitioned by file path, in a declared zone."""

    prefix: str
    zone: str = ""

    @classmethod
    def of(cls, cfg: Configuration) -> Catalog:
        return cls(cfg.s3.prefix, cfg.zone.name)

    def place(self, relative_path: str) -> tuple[dg.AssetKey, str | None]:
        if self.zone:
            return zone_asset_key(self.zone), relative_path
        return asset_key_for(self.prefix, relative_path), None


def object_landed(obj: UploadedObject, catalog: Catalog, uri: str) -> dg.AssetMaterialization | dg.AssetObservation:
    """A chunk as it lands. Its key is text, not a link: the next version deletes it. On a
    zone's partition it is an observation: the partition is materialized once the whole
    version has landed (`file_completed`), not at its first chunk."""
    metadata: dict = {
        "s3_key": dg.MetadataValue.text(uri),
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
    key, partition = catalog.place(obj.relative_path)
    event = dg.AssetMaterialization if partition is None else dg.AssetObservation
    return event(
        asset_key=key,
        partition=partition,
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
    item: PreparedItem, version: FileVersion, record: FileStatus, catalog: Catalog, uri: str
) -> dg.AssetMaterialization:
    """A file version landed: where to read it (the dataset's folder, which later versions
    keep), rows, chunks (a table), bytes and version."""
    metadata: dict = {
        "s3_uri": dg.MetadataValue.url(uri),
        "read_with": f"s3proc read {uri}",
        "fileId": record.file_id,
        "status": record.status.name,
        "rows": item.record_count or 0,
        "chunks": len(item.chunks),
        "bytes": record.processed_bytes or 0,
        "sha256": version.sha256,
        "success_rate": record.processing_stats.success_rate,
        "compression": item.compression or "",
        "file_type": f"{item.item.file_type.value} ({item.item.file_type.meaning})",
    }
    if item.is_tabular:
        metadata["chunk_list"] = chunk_table(item)
    if item.columns:  # the standard key: the catalog shows the columns, and drift is judged by them
        metadata["dagster/column_schema"] = dg.TableSchema(
            columns=[dg.TableColumn(name, kind) for name, kind in item.columns]
        )
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
    key, partition = catalog.place(item.item.relative_path)
    return dg.AssetMaterialization(
        asset_key=key,
        partition=partition,
        description=f"{item.item.relative_path} completed",
        metadata=metadata,
        tags={KIND_TAG: "file"},
    )


def file_failed(
    catalog: Catalog, file: FileInRun, reason: str, gave_up: GaveUp
) -> dg.AssetObservation | dg.AssetCheckEvaluation:
    """A file that failed for good, on its asset: the catalog shows it with its reason (a
    failed `landed` check of its partition in a declared zone, an observation otherwise)."""
    relative = file.name
    metadata: dict = {"status": "FAILED", "reason": reason, "fileIds": ", ".join(gave_up.failed)}
    if gave_up.parked:
        metadata["parked_at"] = str(gave_up.parked)
    elif gave_up.park_error:
        metadata["not_parked"] = gave_up.park_error
    key, partition = catalog.place(relative)
    if partition is not None:
        return landed_check(key, partition, passed=False, description=f"{relative} FAILED: {reason}", metadata=metadata)
    return dg.AssetObservation(
        asset_key=key, description=f"{relative} FAILED: {reason}", metadata=metadata, tags={KIND_TAG: "failure"}
    )


def file_recovered(record: FileStatus, catalog: Catalog, relative_path: str, uri: str) -> dg.AssetMaterialization:
    """A file version crash recovery found landed whole (its run died after the commit): its
    landing in the catalog, as far as the record tells (no chunk table, no columns), so the
    catalog's latest landing is never an older version than the store's."""
    key, partition = catalog.place(relative_path)
    return dg.AssetMaterialization(
        asset_key=key,
        partition=partition,
        description=f"{relative_path}: landed whole; its run died after the commit, so crash recovery records it",
        metadata={
            "s3_uri": dg.MetadataValue.url(uri),
            "read_with": f"s3proc read {uri}",
            "fileId": record.file_id,
            "status": record.status.name,
            "rows": record.processing_stats.successful_records,
            "chunks": record.total_chunks,
            "bytes": record.processed_bytes or 0,
            "sha256": record.checksum or "",
            "completed_by": "crash recovery (reconcile_job)",
        },
        tags={KIND_TAG: "file"},
    )


def zone_columns(instance: dg.DagsterInstance, zone: str) -> list[tuple[str, str]] | None:
    """The columns of the zone's last landing of a table, as its materialization recorded them."""
    return landed_columns(instance, zone_asset_key(zone))


def landed_columns(
    instance: dg.DagsterInstance, key: dg.AssetKey, before_storage_id: int | None = None
) -> list[tuple[str, str]] | None:
    """The columns of the asset's last materialization (before `before_storage_id`) of a
    table with records. A landing without columns (a plain object, an archive) or without a
    record (a header alone, every column VARCHAR) says nothing of the zone's columns: taken
    as the last landing, it let the next file's retyped column land unseen even in a
    blocking zone, and flagged the next good one."""
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, before_storage_id=before_storage_id), limit=100, cursor=cursor
        )
        for record in page.records:
            materialization = record.asset_materialization
            if (columns := columns_of(materialization)) and rows_of(materialization) != 0:
                return columns
        if not page.has_more:
            return None
        cursor = page.cursor


def rows_of(materialization: dg.AssetMaterialization | None) -> int | None:
    """The records a landing held (`rows`), or None when it does not say."""
    rows = materialization.metadata.get("rows") if materialization else None
    return rows.value if isinstance(rows, dg.IntMetadataValue) else None


def columns_of(materialization: dg.AssetMaterialization | None) -> list[tuple[str, str]]:
    """(name, type) of the columns a file's materialization recorded (`dagster/column_schema`)."""
    schema = materialization.metadata.get("dagster/column_schema") if materialization else None
    return [(c.name, c.type) for c in schema.value.columns] if schema else []


def drift_check(key: dg.AssetKey, partition: str, item: PreparedItem) -> dg.AssetCheckEvaluation:
    """The file's columns against the zone's last landing: WARN when they differ."""
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=SCHEMA_CHECK,
        passed=not item.schema_drift,
        partition=partition,
        severity=dg.AssetCheckSeverity.WARN,
        description=item.schema_drift or "no column added, removed or retyped against the zone's last landing, if any",
        metadata={"difference": item.schema_drift} if item.schema_drift else {},
    )


def drift_blocked(key: dg.AssetKey, partition: str, reason: str) -> dg.AssetCheckEvaluation:
    """A blocking zone's refusal, on the file's partition: nothing landed, the difference is why."""
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=SCHEMA_CHECK,
        passed=False,
        partition=partition,
        severity=dg.AssetCheckSeverity.ERROR,
        description=reason,
        metadata={"blocked": True},
    )


def landed_check(
    key: dg.AssetKey, partition: str, passed: bool, description: str, metadata: dict | None = None
) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=LANDED_CHECK,
        passed=passed,
        partition=partition,
        description=description,
        metadata=metadata or {},
    )


def skipped(version: FileVersion) -> str:
    rel, sha = version.source.relative_path, version.sha256[:12]
    if version.outcome is ClaimOutcome.BUSY:
        return f"{rel}: run {version.holder} is already processing this version (sha256 {sha}); this run skips it"
    return f"{rel}: unchanged (sha256 {sha}), skipped"


def settled_elsewhere(relative_path: str, record: FileStatus) -> str:
    return (
        f"{relative_path}: gone from its path, {record.status.name} by run {(record.run_id or '')[:8]} "
        "since this run was requested; this run skips it"
    )


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
