"""A dataset's `_manifest.json`: written last, so its presence means the dataset is whole."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from s3proc_dagster.transfer.upload import upload_bytes

MANIFEST_NAME = "_manifest.json"


@dataclass
class Manifest:
    dataset_key: str
    file_sha256: str
    total_rows: int
    total_bytes: int
    compression: str
    chunks: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(
            {
                "datasetKey": data["dataset_key"],
                "fileSha256": data["file_sha256"],
                "totalRows": data["total_rows"],
                "totalBytes": data["total_bytes"],
                "compression": data["compression"],
                "chunks": data["chunks"],
                "rejected": data["rejected"],
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(d["datasetKey"], d["fileSha256"], d["totalRows"], d["totalBytes"], d["compression"], d["chunks"], d.get("rejected", []))


def write_manifest(client: Any, bucket: str, dataset_prefix: str, manifest: Manifest) -> str:
    key = f"{dataset_prefix}/{MANIFEST_NAME}"
    upload_bytes(client, bucket, key, manifest.to_json().encode(), content_type="application/json", metadata={"x-completed": "true"})
    return key


def read_manifest(client: Any, bucket: str, dataset_prefix: str) -> Manifest | None:
    try:
        body = client.get_object(Bucket=bucket, Key=f"{dataset_prefix}/{MANIFEST_NAME}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return Manifest.from_json(body.decode())
