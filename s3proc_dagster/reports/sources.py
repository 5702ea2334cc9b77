"""The project's sources as Arrow tables: the progress store (either backend) and S3 manifests.

DuckDB's sqlite scanner and httpfs cannot be installed here, and MongoDB has no DuckDB
reader anyway, so both stores are exported through the store contract, which keeps the
reports backend-neutral.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from s3proc_dagster.models import ChunkStatus, FileStatus, Request, RequestData
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.manifest import MANIFEST_NAME, Manifest


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


FILE_SCHEMA = pa.schema(
    [
        ("file_id", pa.string()),
        ("file_path", pa.string()),
        ("file_name", pa.string()),
        ("status", pa.string()),
        ("file_type", pa.string()),
        ("file_size", pa.int64()),
        ("total_chunks", pa.int64()),
        ("completed_chunks", pa.int64()),
        ("failed_chunks", pa.int64()),
        ("successful_records", pa.int64()),
        ("failed_records", pa.int64()),
        ("success_rate", pa.float64()),
        ("output_key", pa.string()),
        ("error_details", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("completed_at", pa.timestamp("us", tz="UTC")),
        ("metadata", pa.string()),
    ]
)
CHUNK_SCHEMA = pa.schema(
    [
        ("chunk_id", pa.string()),
        ("file_id", pa.string()),
        ("chunk_index", pa.int64()),
        ("record_count", pa.int64()),
        ("status", pa.string()),
        ("duration", pa.float64()),
        ("size_bytes", pa.int64()),
        ("retry_count", pa.int64()),
        ("successful_records", pa.int64()),
        ("failed_records", pa.int64()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("file_id", pa.string()), ("kind", pa.string()), ("rule", pa.string()), ("count", pa.int64())]
)
REQUEST_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("status", pa.string()),
        ("file_name", pa.string()),
        ("output_csv_url", pa.string()),
        ("errors", pa.int64()),
    ]
)
ROW_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("serial_number", pa.int64()),
        ("product_name", pa.string()),
        ("images", pa.int64()),
        ("done", pa.int64()),
        ("completed_at", pa.timestamp("us", tz="UTC")),
    ]
)
DATASET_SCHEMA = pa.schema(
    [
        ("dataset_key", pa.string()),
        ("objects", pa.int64()),
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("compression", pa.string()),
    ]
)


def _file_row(f: FileStatus) -> dict[str, Any]:
    s = f.processing_stats
    return {
        "file_id": f.file_id,
        "file_path": f.file_path,
        "file_name": f.file_name,
        "status": f.status.value,
        "file_type": f.file_type.value if f.file_type else None,
        "file_size": f.file_size,
        "total_chunks": f.total_chunks,
        "completed_chunks": s.completed_chunks,
        "failed_chunks": s.failed_chunks,
        "successful_records": s.successful_records,
        "failed_records": s.failed_records,
        "success_rate": s.success_rate,
        "output_key": f.output_key,
        "error_details": f.error_details,
        "created_at": f.created_at,
        "completed_at": f.completed_at,
        "metadata": json.dumps(f.metadata),
    }


def _error_rows(f: FileStatus) -> list[dict[str, Any]]:
    """The error summary's nested counts, flat: a row per (kind, rule), which SQL can group by."""
    return [
        {"file_id": f.file_id, "kind": kind, "rule": r, "count": n}
        for kind, counts in f.error_summary.items()
        for r, n in counts.items()
    ]


def _chunk_row(c: ChunkStatus) -> dict[str, Any]:
    return {
        "chunk_id": c.chunk_id,
        "file_id": c.file_id,
        "chunk_index": c.chunk_index,
        "record_count": c.record_count,
        "status": c.status.value,
        "duration": c.duration,
        "size_bytes": c.size_bytes,
        "retry_count": c.retry_count,
        "successful_records": c.processing_stats.successful_records,
        "failed_records": c.processing_stats.failed_records,
    }


def _request_row(r: Request) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "status": r.status.value,
        "file_name": r.file_name,
        "output_csv_url": r.output_csv_url,
        "errors": len(r.errors),
    }


def _request_data_row(d: RequestData) -> dict[str, Any]:
    return {
        "request_id": d.request_id,
        "serial_number": d.serial_number,
        "product_name": d.product_name,
        "images": len(d.input_image_urls),
        "done": sum(1 for u in d.output_image_urls if u),
        "completed_at": d.completed_at,
    }


def progress_tables(store: ProgressStore) -> dict[str, pa.Table]:
    files = store.list_files()
    file_rows = [_file_row(f) for f in files]
    error_rows = [row for f in files for row in _error_rows(f)]
    chunk_rows = [_chunk_row(c) for c in store.list_all_chunks()]
    requests = store.list_requests()
    request_rows = [_request_row(r) for r in requests]
    data_rows = [_request_data_row(d) for r in requests for d in store.list_request_rows(r.request_id)]
    return {
        "file_status": _table(file_rows, FILE_SCHEMA),
        "chunk_status": _table(chunk_rows, CHUNK_SCHEMA),
        "validation_errors": _table(error_rows, ERRORS_SCHEMA),
        "requests": _table(request_rows, REQUEST_SCHEMA),
        "request_data": _table(data_rows, ROW_SCHEMA),
    }


def dataset_table(client: Any, bucket: str, prefix: str) -> pa.Table:
    """Every `_manifest.json` under the prefix, read back from S3."""
    rows = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/" + MANIFEST_NAME):
                continue
            manifest = Manifest.from_json(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode())
            rows.append(
                {
                    "dataset_key": manifest.dataset_key,
                    "objects": len(manifest.chunks) + len(manifest.rejected),
                    "rows": manifest.total_rows,
                    "bytes": manifest.total_bytes,
                    "compression": manifest.compression,
                }
            )
    return _table(rows, DATASET_SCHEMA)
