"""Snapshot: the staged copy and its SHA-256, a local file copied by the kernel, a stream in one read."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest

from s3proc_dagster.errors import UnsafeSourceError
from s3proc_dagster.files import checksum
from s3proc_dagster.files.checksum import Snapshot, sha256_file, snapshot, snapshot_stream


class CountingReader(io.BytesIO):
    """Records every read, to prove the source is read once, start to end."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        block = super().read(size)
        self.bytes_read += len(block)
        return block


def test_snapshot_copies_into_a_folder_named_by_checksum_and_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * checksum.BLOCK_SIZE + 123)  # several blocks and a ragged tail
    source = tmp_path / "in" / "data.csv"
    source.parent.mkdir()
    source.write_bytes(data)

    snap = snapshot(source, tmp_path / "staging")

    expected = hashlib.sha256(data).hexdigest()
    assert snap == Snapshot(tmp_path / "staging" / expected / "data.csv", expected, len(data))
    assert snap.path.read_bytes() == data
    assert sha256_file(snap.path) == expected


def test_a_local_file_is_copied_by_the_kernel_and_python_copies_where_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(checksum.BLOCK_SIZE + 5)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    calls: list[int] = []
    kernel_copy = os.copy_file_range

    def counted(*args: int) -> int:
        calls.append(args[2])
        return kernel_copy(*args)

    monkeypatch.setattr(checksum.os, "copy_file_range", counted)
    snap = snapshot(source, tmp_path / "staging")
    assert calls and snap.sha256 == hashlib.sha256(data).hexdigest() and snap.path.read_bytes() == data

    def unsupported(*args: int) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")  # another filesystem, an older kernel

    monkeypatch.setattr(checksum.os, "copy_file_range", unsupported)
    snap = snapshot(source, tmp_path / "staging-2")
    assert snap.sha256 == hashlib.sha256(data).hexdigest() and snap.path.read_bytes() == data


def test_a_copy_in_many_kernel_ranges_is_hashed_in_order_as_it_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5 * checksum.BLOCK_SIZE + 321)  # ranges of 1.5 blocks: pieces and a ragged tail
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    monkeypatch.setattr(checksum, "KERNEL_COPY_BYTES", checksum.BLOCK_SIZE * 3 // 2)
    ranges: list[int] = []
    kernel_copy = os.copy_file_range

    def counted(src: int, dst: int, count: int) -> int:
        copied = kernel_copy(src, dst, count)
        ranges.append(copied)
        return copied

    monkeypatch.setattr(checksum.os, "copy_file_range", counted)
    snap = snapshot(source, tmp_path / "staging")
    assert len([r for r in ranges if r]) == 4
    assert snap == Snapshot(snap.path, hashlib.sha256(data).hexdigest(), len(data))
    assert snap.path.read_bytes() == data


def test_a_reader_that_has_buffered_bytes_is_copied_from_where_it_stands(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    with source.open("rb") as readable:
        assert readable.read(3) == data[:3]  # the reader holds the next 8 KiB in its buffer
        snap = snapshot_stream(readable, "rest.bin", tmp_path / "staging")
    assert snap.path.read_bytes() == data[3:] and snap.sha256 == hashlib.sha256(data[3:]).hexdigest()


def test_a_file_larger_than_max_bytes_while_the_kernel_copies_it_is_refused_and_nothing_is_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "growing.bin"
    source.write_bytes(b"x" * 1000)
    kernel_copy = os.copy_file_range

    def grows(src: int, dst: int, count: int) -> int:  # the producer appends after the size check
        with source.open("ab") as more:
            more.write(b"y" * 1000)
        return kernel_copy(src, dst, count)

    monkeypatch.setattr(checksum.os, "copy_file_range", grows)
    with pytest.raises(UnsafeSourceError, match="more than MAX_FILE_BYTES"):
        snapshot(source, tmp_path / "staging", max_bytes=1500)
    assert [p.name for p in (tmp_path / "staging").iterdir()] == []


def test_snapshot_reads_the_stream_exactly_once(tmp_path: Path) -> None:
    data = os.urandom(2 * checksum.BLOCK_SIZE + 7)
    reader = CountingReader(data)

    snap = snapshot_stream(reader, "blob.bin", tmp_path)

    assert reader.bytes_read == len(data)
    assert snap.sha256 == hashlib.sha256(data).hexdigest()
    assert snap.size == len(data)


def test_snapshot_never_modifies_the_source(tmp_path: Path) -> None:
    source = tmp_path / "report.json"
    source.write_bytes(b'{"a": 1}')
    os.utime(source, ns=(1_000_000_000, 2_000_000_000))
    before = source.stat()

    snapshot(source, tmp_path / "staging")

    after = source.stat()
    assert source.read_bytes() == b'{"a": 1}'
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)


def test_snapshotting_the_same_version_twice_reuses_the_copy_and_leaves_no_temp_files(tmp_path: Path) -> None:
    source = tmp_path / "a.csv"
    source.write_bytes(b"x,y\n1,2\n")
    staging = tmp_path / "staging"

    first = snapshot(source, staging)
    inode = first.path.stat().st_ino
    second = snapshot(source, staging)

    assert second == first
    assert first.path.stat().st_ino == inode  # kept, not rewritten
    assert sorted(p.name for p in staging.iterdir()) == [first.sha256]


def test_a_damaged_staged_copy_is_replaced_by_a_good_one(tmp_path: Path) -> None:
    source = tmp_path / "a.csv"
    source.write_bytes(b"x,y\n1,2\n")
    staging = tmp_path / "staging"
    snap = snapshot(source, staging)
    snap.path.write_bytes(b"half")

    again = snapshot(source, staging)

    assert again.path.read_bytes() == b"x,y\n1,2\n"


def test_empty_file_snapshots_to_the_empty_sha256(tmp_path: Path) -> None:
    source = tmp_path / "empty.txt"
    source.write_bytes(b"")

    snap = snapshot(source, tmp_path / "staging")

    assert snap.sha256 == hashlib.sha256(b"").hexdigest()
    assert snap.size == 0 and snap.path.read_bytes() == b""


@pytest.mark.parametrize("name", ["../escape.csv", "a/b.csv", "..", ""])
def test_a_stream_name_that_is_not_a_plain_file_name_is_refused_before_writing(tmp_path: Path, name: str) -> None:
    staging = tmp_path / "staging"

    with pytest.raises(ValueError, match="plain file name"):
        snapshot_stream(io.BytesIO(b"data"), name, staging)

    assert not staging.exists()
