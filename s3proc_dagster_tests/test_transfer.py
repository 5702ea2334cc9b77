"""S3 transfer against real SeaweedFS: streaming upload, resume, verification, manifests, sweeps."""

from __future__ import annotations

import os
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from benchmarks.support import S3Endpoint
from s3proc_dagster.errors import ChecksumMismatch, ObjectMissing
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import UploadStatus, utcnow
from s3proc_dagster.recovery import sweep_uploads
from s3proc_dagster.stores.sqlite import SQLiteProgressStore
from s3proc_dagster.transfer.manifest import Manifest, ManifestPart, commit, is_intact, part_key, read_manifest
from s3proc_dagster.transfer.recovery import delete_prefix, open_uploads
from s3proc_dagster.transfer.upload import PART_SIZE, abort_upload, upload_bytes, upload_file
from s3proc_dagster.transfer.verify import object_matches, verify_object


def blob(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


class FailAfterParts:
    """A real boto3 client whose `upload_part` raises after `n` parts: a connection that
    drops mid-upload, while everything that did reach S3 stays there."""

    def __init__(self, client: Any, n: int) -> None:
        self._client, self._left = client, n

    def upload_part(self, **kwargs: Any) -> Any:
        if self._left == 0:
            raise ConnectionResetError("connection reset by peer (injected)")
        self._left -= 1
        return self._client.upload_part(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_small_file_is_one_put_with_checksum_and_completion_metadata(
    s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    src = blob(tmp_path / "a.bin", 1000)
    result = upload_file(
        s3.client(),
        s3.bucket,
        f"{s3_prefix}/a.bin",
        src,
        content_type="application/octet-stream",
        metadata={"x-completed": "true"},
    )
    head = s3.client().head_object(Bucket=s3.bucket, Key=f"{s3_prefix}/a.bin")
    assert result.parts == 1 and head["Metadata"] == {"x-completed": "true", "x-sha256": sha256_file(src)}


def test_large_file_goes_multipart_in_8_mib_parts_and_reads_back_equal(
    s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
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


def test_interrupted_upload_resumes_from_the_parts_s3_has(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    src = blob(tmp_path / "r.bin", 5 * PART_SIZE + 7)
    key = f"{s3_prefix}/r.bin"
    with pytest.raises(ConnectionResetError):
        upload_file(
            FailAfterParts(s3.client(), 3), s3.bucket, key, src, content_type="x/y", journal=store, file_id="f1"
        )
    (task,) = store.list_upload_tasks("f1")
    assert task.status is UploadStatus.FAILED and task.upload_id and task.checksum == sha256_file(src)
    assert [u["UploadId"] for u in open_uploads(s3.client(), s3.bucket, key)] == [task.upload_id]  # kept for the retry

    again = upload_file(s3.client(), s3.bucket, key, src, content_type="x/y", journal=store, file_id="f1")
    assert (again.parts, again.parts_sent) == (6, 3)  # three parts were already in S3
    assert s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read() == src.read_bytes()
    assert store.list_upload_tasks("f1") == [] and list(open_uploads(s3.client(), s3.bucket, key)) == []


def test_other_bytes_for_the_same_key_never_resume_an_upload(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    key = f"{s3_prefix}/v.bin"
    first = blob(tmp_path / "v1.bin", 2 * PART_SIZE + 1)
    with pytest.raises(ConnectionResetError):
        upload_file(FailAfterParts(s3.client(), 1), s3.bucket, key, first, content_type="x/y", journal=store)
    second = blob(tmp_path / "v2.bin", 2 * PART_SIZE + 1)
    result = upload_file(s3.client(), s3.bucket, key, second, content_type="x/y", journal=store)
    assert result.parts_sent == 3
    assert s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read() == second.read_bytes()
    (left,) = store.list_upload_tasks()  # the first version's upload is still recorded, for the sweep
    assert left.checksum == sha256_file(first)
    assert abort_upload(s3.client(), left, store) and store.list_upload_tasks() == []
    assert list(open_uploads(s3.client(), s3.bucket, key)) == []


def test_an_upload_s3_no_longer_has_starts_again(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    src = blob(tmp_path / "g.bin", 2 * PART_SIZE + 1)
    key = f"{s3_prefix}/g.bin"
    with pytest.raises(ConnectionResetError):
        upload_file(FailAfterParts(s3.client(), 1), s3.bucket, key, src, content_type="x/y", journal=store)
    (task,) = store.list_upload_tasks()
    s3.client().abort_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=task.upload_id)
    result = upload_file(s3.client(), s3.bucket, key, src, content_type="x/y", journal=store)
    assert result.parts_sent == 3 and object_matches(s3.client(), s3.bucket, key, result.size, result.sha256)


def test_verification_tells_wrong_bytes_from_a_missing_object(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    src = blob(tmp_path / "v.bin", 500)
    r = upload_file(s3.client(), s3.bucket, f"{s3_prefix}/v.bin", src, content_type="application/octet-stream")
    with pytest.raises(ChecksumMismatch, match="500 bytes in S3, expected 501"):
        verify_object(s3.client(), s3.bucket, r.key, 501, r.sha256)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        verify_object(s3.client(), s3.bucket, r.key, 500, "0" * 64)
    with pytest.raises(ObjectMissing, match="not in S3"):
        verify_object(s3.client(), s3.bucket, f"{s3_prefix}/nope", 1, "x")
    assert not object_matches(s3.client(), s3.bucket, f"{s3_prefix}/nope", 1, "x")


def test_sweep_aborts_old_unowned_uploads_under_the_prefix_only(s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    client = s3.client()
    mine = client.create_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}/out/x.bin")["UploadId"]
    client.upload_part(Bucket=s3.bucket, Key=f"{s3_prefix}/out/x.bin", UploadId=mine, PartNumber=1, Body=b"x" * 1024)
    users = client.create_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}/out/incoming/u.bin")["UploadId"]
    elsewhere = client.create_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}-other/y.bin")["UploadId"]
    young = sweep_uploads(store, client, s3.bucket, f"{s3_prefix}/out", utcnow() - timedelta(hours=1), lambda _: False)
    assert young == []  # younger than the bound: may still be resumed
    swept = sweep_uploads(
        store,
        client,
        s3.bucket,
        f"{s3_prefix}/out",
        utcnow() + timedelta(seconds=5),
        lambda _: False,
        exclude_prefixes=(f"{s3_prefix}/out/incoming/",),
    )
    assert swept == [f"{s3_prefix}/out/x.bin"]
    left = {u["UploadId"] for u in open_uploads(client, s3.bucket, s3_prefix)}
    assert left == {users, elsewhere}
    client.abort_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}/out/incoming/u.bin", UploadId=users)
    client.abort_multipart_upload(Bucket=s3.bucket, Key=f"{s3_prefix}-other/y.bin", UploadId=elsewhere)


def test_delete_prefix_keeps_what_it_is_told_to(s3: S3Endpoint, s3_prefix: str) -> None:
    client = s3.client()
    for name in ("p/1", "p/2", "p/3", "q/1"):
        client.put_object(Bucket=s3.bucket, Key=f"{s3_prefix}/{name}", Body=b"1")
    assert delete_prefix(client, s3.bucket, f"{s3_prefix}/p/", keep={f"{s3_prefix}/p/2"}) == 2
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3_prefix}/")["Contents"]]
    assert keys == [f"{s3_prefix}/p/2", f"{s3_prefix}/q/1"]


def _dataset_version(client: Any, s3: S3Endpoint, dataset: str, sha: str, payload: bytes) -> Manifest:
    """One version's part written under its own folder; the manifest that would commit it."""
    key = part_key(dataset, sha, 0)
    sent = upload_bytes(client, s3.bucket, key, payload, content_type="application/octet-stream")
    return Manifest(dataset, sha, 1, sent.size, "ZSTD", [ManifestPart(0, key, 1, sent.size, sent.sha256, 0, 0)])


def test_commit_swaps_the_manifest_then_removes_the_previous_version(s3: S3Endpoint, s3_prefix: str) -> None:
    client = s3.client()
    dataset = f"{s3_prefix}/ds"
    assert read_manifest(client, s3.bucket, dataset) is None
    v1 = _dataset_version(client, s3, dataset, "1" * 64, b"one")
    commit(client, s3.bucket, v1)
    assert read_manifest(client, s3.bucket, dataset) == v1 and is_intact(client, s3.bucket, v1)
    v2 = _dataset_version(client, s3, dataset, "2" * 64, b"two")
    assert read_manifest(client, s3.bucket, dataset) == v1  # v2's parts are written, not committed
    assert commit(client, s3.bucket, v2) == 1  # v1's part
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=dataset + "/")["Contents"])
    assert keys == sorted(
        [f"{dataset}/_manifest.json", f"{dataset}/_symlink_format_manifest/manifest", v2.chunks[0].key]
    )
    symlinks = client.get_object(Bucket=s3.bucket, Key=f"{dataset}/_symlink_format_manifest/manifest")["Body"].read()
    assert symlinks.decode() == f"s3://{s3.bucket}/{v2.chunks[0].key}\n"
    head = client.head_object(Bucket=s3.bucket, Key=f"{dataset}/_manifest.json")
    assert head["Metadata"]["x-completed"] == "true" and head["Metadata"]["x-file-sha256"] == "2" * 64
    client.delete_object(Bucket=s3.bucket, Key=v2.chunks[0].key)
    assert not is_intact(client, s3.bucket, v2)  # a manifest is trusted only with every part in place


def test_an_upload_given_up_during_an_outage_is_aborted_by_the_sweep(
    s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    import boto3
    from botocore.config import Config

    from s3proc_dagster.cli.processes import free_port

    store = SQLiteProgressStore(tmp_path / "p.db")
    src = blob(tmp_path / "o.bin", 2 * PART_SIZE + 1)
    key = f"{s3_prefix}/out/o.bin"
    with pytest.raises(ConnectionResetError):
        upload_file(FailAfterParts(s3.client(), 1), s3.bucket, key, src, content_type="x/y", journal=store, file_id="f")
    (task,) = store.list_upload_tasks()
    s3_gone = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    assert not abort_upload(s3_gone, task, store)  # S3 unreachable: the abort fails too...
    assert [t.id for t in store.list_upload_tasks()] == [task.id]  # ...and the record stays for the sweep
    swept = sweep_uploads(
        store, s3.client(), s3.bucket, f"{s3_prefix}/out", utcnow() + timedelta(seconds=5), lambda _: False
    )
    assert swept == [key]
    assert list(open_uploads(s3.client(), s3.bucket, key)) == [] and store.list_upload_tasks() == []
