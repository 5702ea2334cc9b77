"""S3 transfer against real SeaweedFS: streaming upload, verification, recovery, manifests."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest

from s3proc_dagster.errors import ChecksumMismatch
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.transfer.manifest import Manifest, read_manifest, write_manifest
from s3proc_dagster.transfer.recovery import abort_stale_uploads, delete_prefix, has_completion_marker
from s3proc_dagster.transfer.upload import PART_SIZE, upload_file
from s3proc_dagster.transfer.verify import verify_object
from s3proc_dagster_tests.conftest import S3Endpoint


def blob(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_small_file_is_one_put_with_checksum_and_completion_metadata(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    src = blob(tmp_path / "a.bin", 1000)
    result = upload_file(s3.client(), s3.bucket, f"{s3_prefix}/a.bin", src, content_type="application/octet-stream",
                         metadata={"x-completed": "true"})
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"{s3_prefix}/a.bin")
    assert result.parts == 1 and head["Metadata"] == {"x-completed": "true", "x-sha256": sha256_file(src)}
    assert has_completion_marker(s3.client(), s3.bucket, f"{s3_prefix}/a.bin")


def test_large_file_goes_multipart_in_8_mib_parts_and_reads_back_equal(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    src = blob(tmp_path / "big.bin", 2 * PART_SIZE + 12345)
    result = upload_file(s3.client(), s3.bucket, f"{s3_prefix}/big.bin", src, content_type="application/octet-stream")
    assert result.parts == 3 and result.size == src.stat().st_size
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"{s3_prefix}/big.bin")["Body"].read()
    assert body == src.read_bytes()
    verify_object(s3.client(), s3.bucket, f"{s3_prefix}/big.bin", result.size, result.sha256, deep=True)


def test_upload_memory_is_one_part_not_the_file(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    src = blob(tmp_path / "m.bin", 6 * PART_SIZE)
    tracemalloc.start()
    upload_file(s3.client(), s3.bucket, f"{s3_prefix}/m.bin", src, content_type="application/octet-stream")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * PART_SIZE  # 48 MiB file, a part or two in flight


def test_verification_catches_wrong_size_wrong_checksum_and_missing_object(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    src = blob(tmp_path / "v.bin", 500)
    r = upload_file(s3.client(), s3.bucket, f"{s3_prefix}/v.bin", src, content_type="application/octet-stream")
    with pytest.raises(ChecksumMismatch, match="500 bytes in S3, expected 501"):
        verify_object(s3.client(), s3.bucket, r.key, 501, r.sha256)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        verify_object(s3.client(), s3.bucket, r.key, 500, "0" * 64)
    with pytest.raises(ChecksumMismatch, match="cannot be read back"):
        verify_object(s3.client(), s3.bucket, f"{s3_prefix}/nope", 1, "x")


def test_stale_multipart_uploads_are_aborted_only_under_the_prefix(s3: S3Endpoint, s3_prefix: str) -> None:
    client = s3.client()
    mine = client.create_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}/a/x.bin")["UploadId"]
    client.upload_part(Bucket=s3.bucket, Key=f"{s3_prefix}/a/x.bin", UploadId=mine, PartNumber=1, Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}/b/y.bin")["UploadId"]
    assert abort_stale_uploads(client, s3.bucket, f"{s3_prefix}/a/") == [f"{s3_prefix}/a/x.bin"]
    left = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{s3_prefix}/").get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other]
    client.abort_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}/b/y.bin", UploadId=other)


def test_delete_prefix_keeps_what_it_is_told_to(s3: S3Endpoint, s3_prefix: str) -> None:
    client = s3.client()
    for name in ("p/1", "p/2", "p/3", "q/1"):
        client.put_object(Bucket=s3.bucket, Key=f"{s3_prefix}/{name}", Body=b"1")
    assert delete_prefix(client, s3.bucket, f"{s3_prefix}/p/", keep={f"{s3_prefix}/p/2"}) == 2
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3_prefix}/")["Contents"]]
    assert keys == [f"{s3_prefix}/p/2", f"{s3_prefix}/q/1"]


def test_manifest_round_trips_and_marks_the_dataset_complete(s3: S3Endpoint, s3_prefix: str) -> None:
    client = s3.client()
    manifest = Manifest(f"{s3_prefix}/ds", "f" * 64, 3, 99, "ZSTD", [{"chunkIndex": 0, "key": "k", "rows": 3}])
    assert read_manifest(client, s3.bucket, f"{s3_prefix}/ds") is None
    write_manifest(client, s3.bucket, f"{s3_prefix}/ds", manifest)
    assert read_manifest(client, s3.bucket, f"{s3_prefix}/ds") == manifest
    assert has_completion_marker(client, s3.bucket, f"{s3_prefix}/ds/_manifest.json")
