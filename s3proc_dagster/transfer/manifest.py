"""A dataset's `_manifest.json` is its commit: readers see one complete version, never a mix.

Layout of the dataset `<prefix>/<rel>/<name>/`:

    v-<sha16>/part-00000.parquet ...       the parts of one file version (first 16 hex of its SHA-256)
    v-<sha16>/_rejected/part-00000.parquet  records that failed validation, with `_rules`
    _symlink_format_manifest/manifest       the current parts, one s3:// URI per line (Athena, Presto, Spark)
    _manifest.json                          the current version: file SHA-256, rows, bytes, every part's SHA-256

A new version's parts go under their own `v-<sha16>/` folder, so writing them never
touches the parts the current manifest lists. Once every part is uploaded and verified,
the symlink manifest and then `_manifest.json` are replaced (each PUT is atomic), and
only then are the previous version's objects deleted. A reader that starts from the
manifest sees the previous complete version until the swap and the new complete version
after it. Recovery trusts a manifest only when it names the version the store records
and every part it lists is in S3 with its size and checksum (`is_intact`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from s3proc_dagster.models import ChunkStatus
from s3proc_dagster.transfer.keys import join_key, prefix_folder
from s3proc_dagster.transfer.recovery import delete_prefix
from s3proc_dagster.transfer.upload import upload_bytes
from s3proc_dagster.transfer.verify import object_matches

MANIFEST_NAME = "_manifest.json"
SYMLINK_MANIFEST = "_symlink_format_manifest/manifest"
VERSION_HEX = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION_FOLDER = re.compile(rf"v-[0-9a-f]{{{VERSION_HEX}}}/")


def version_folder(sha256: str) -> str:
    """`v-<first 16 hex>`: 64 bits keep versions apart without making keys unreadable."""
    return f"v-{sha256.split(':', 1)[0][:VERSION_HEX]}"


def part_key(dataset_key: str, sha256: str, chunk_index: int, rejected: bool = False) -> str:
    name = f"part-{chunk_index:05d}.parquet"
    return join_key(dataset_key, version_folder(sha256), "_rejected" if rejected else "", name)


@dataclass(frozen=True)
class ManifestPart:
    """One Parquet object of the dataset, as the manifest lists it."""

    chunk_index: int
    key: str
    rows: int
    bytes: int
    sha256: str
    start_offset: int | None = None
    end_offset: int | None = None
    rules: dict[str, int] = field(default_factory=dict)


_JSON_NAMES = {"chunk_index": "chunkIndex", "start_offset": "startOffset", "end_offset": "endOffset"}
_FIELD_NAMES = {v: k for k, v in _JSON_NAMES.items()}


@dataclass
class Manifest:
    dataset_key: str
    file_sha256: str
    total_rows: int
    total_bytes: int
    compression: str
    chunks: list[ManifestPart] = field(default_factory=list)
    rejected: list[ManifestPart] = field(default_factory=list)

    @property
    def version_prefix(self) -> str:
        return join_key(self.dataset_key, version_folder(self.file_sha256)) + "/"

    def to_json(self) -> str:
        return json.dumps(
            {
                "datasetKey": self.dataset_key,
                "fileSha256": self.file_sha256,
                "versionPrefix": self.version_prefix,
                "totalRows": self.total_rows,
                "totalBytes": self.total_bytes,
                "compression": self.compression,
                "chunks": [_part_json(p) for p in self.chunks],
                "rejected": [_part_json(p) for p in self.rejected],
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        return cls(
            d["datasetKey"],
            d["fileSha256"],
            d["totalRows"],
            d["totalBytes"],
            d["compression"],
            [ManifestPart(**_part_fields(p)) for p in d["chunks"]],
            [ManifestPart(**_part_fields(p)) for p in d.get("rejected", [])],
        )

    def objects(self) -> list[ManifestPart]:
        return [*self.chunks, *self.rejected]

    def vouched_keys(self) -> set[str]:
        """Every key this version's dataset consists of, the commit files included."""
        return {p.key for p in self.objects()} | {
            join_key(self.dataset_key, MANIFEST_NAME),
            join_key(self.dataset_key, SYMLINK_MANIFEST),
        }


def _part_json(part: ManifestPart) -> dict[str, Any]:
    return {_JSON_NAMES.get(k, k): v for k, v in asdict(part).items() if v not in (None, {})}


def _part_fields(data: dict[str, Any]) -> dict[str, Any]:
    known = ManifestPart.__dataclass_fields__
    named = {_FIELD_NAMES.get(k, k): v for k, v in data.items()}
    return {k: v for k, v in named.items() if k in known}


def build(dataset_key: str, version: str, total_rows: int, compression: str, chunks: list[ChunkStatus]) -> Manifest:
    """The manifest of one version from its chunk records, each verified and COMPLETED."""
    return Manifest(
        dataset_key=dataset_key,
        file_sha256=version,
        total_rows=total_rows,
        total_bytes=sum(c.size_bytes or 0 for c in chunks),
        compression=compression,
        chunks=[
            ManifestPart(
                c.chunk_index,
                c.s3_key or "",
                c.record_count - (c.rejected.records if c.rejected else 0),
                c.size_bytes or 0,
                c.sha256 or "",
                c.start_offset,
                c.end_offset,
            )
            for c in chunks
        ],
        rejected=[
            ManifestPart(
                c.chunk_index,
                c.rejected.s3_key,
                c.rejected.records,
                c.rejected.size_bytes,
                c.rejected.sha256,
                rules=c.error_summary.get("validation", {}),
            )
            for c in chunks
            if c.rejected
        ],
    )


def read_manifest(client: Any, bucket: str, dataset_key: str) -> Manifest | None:
    """The committed manifest, or None when the dataset has none (or it does not parse)."""
    try:
        body = client.get_object(Bucket=bucket, Key=join_key(dataset_key, MANIFEST_NAME))["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    try:
        return Manifest.from_json(body.decode())
    except (ValueError, KeyError, TypeError):
        return None  # a manifest we cannot read vouches for nothing


def is_intact(client: Any, bucket: str, manifest: Manifest) -> bool:
    """Every object the manifest lists is in S3 with its size and SHA-256."""
    return all(object_matches(client, bucket, p.key, p.bytes, p.sha256) for p in manifest.objects())


def commit(client: Any, bucket: str, manifest: Manifest) -> int:
    """Make `manifest` the dataset's current version, then delete what no longer belongs.

    Returns how many objects of earlier versions (or strays of crashed runs) were deleted.
    The caller holds the file's claim, so no other run writes under the dataset meanwhile.
    """
    if any(_CONTROL.search(p.key) for p in manifest.chunks):  # one line per part, so no line breaks in keys
        raise ValueError(f"{manifest.dataset_key}: a part key holds a control character")
    lines = "".join(f"s3://{bucket}/{p.key}\n" for p in manifest.chunks)
    upload_bytes(
        client, bucket, join_key(manifest.dataset_key, SYMLINK_MANIFEST), lines.encode(), content_type="text/plain"
    )
    upload_bytes(
        client,
        bucket,
        join_key(manifest.dataset_key, MANIFEST_NAME),
        manifest.to_json().encode(),
        content_type="application/json",
        metadata={"x-completed": "true", "x-file-sha256": manifest.file_sha256},
    )
    return delete_stale_versions(client, bucket, manifest.dataset_key, keep=manifest.vouched_keys())


def delete_stale_versions(client: Any, bucket: str, dataset_key: str, keep: set[str]) -> int:
    """Delete the dataset's version folders' objects except `keep`; return how many.

    Only `<dataset>/v-<hex>/...` is the dataset's to clean: whatever else sits below its
    folder (another source's objects, had one ever landed there) is never touched.
    """
    folder = prefix_folder(dataset_key)
    return delete_prefix(
        client, bucket, folder, keep=keep, only=lambda key: _VERSION_FOLDER.match(key, len(folder)) is not None
    )
