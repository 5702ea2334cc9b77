"""Snapshot a file into the staging area, under the SHA-256 of what was staged.

Every later step reads the snapshot, never the source: the original may change, be
moved to the error directory or vanish from S3 without breaking a retry. A local file is
copied by the kernel (`copy_file_range`: no trip through Python, a reflink where the
filesystem has them) while a thread hashes what has landed in the copy, which no
producer can touch; a stream (an S3 body) is copied and hashed in one pass. Keying the
staging folder by the checksum makes a re-run of the same version land on the same path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from s3proc_dagster.errors import UnsafeSourceError
from s3proc_dagster.files.private import make_private_dir
from s3proc_dagster.sources.confined import check_size, open_regular

BLOCK_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small enough to never matter for memory
KERNEL_COPY_BYTES = 64 << 20  # per copy_file_range call
# where the kernel cannot copy between these two files; nothing was copied yet, so Python does
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


@dataclass(frozen=True)
class Snapshot:
    """The staged copy of one file version: `path` is `<staging_dir>/<sha256>/<name>`."""

    path: Path
    sha256: str
    size: int


def iter_blocks(readable: BinaryIO, block_size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """Blocks of a binary stream until EOF: the one read loop every copy in `files/` uses."""
    while block := readable.read(block_size):
        yield block


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file the product wrote itself (a snapshot, a part); a producer's
    file is hashed through `sha256_stream` on a descriptor `sources.confined` opened."""
    with path.open("rb") as readable:
        return sha256_stream(readable)


def sha256_stream(readable: BinaryIO) -> str:
    return _copy_and_hash(readable, None)[0]


def snapshot(source: Path, staging_dir: Path, roots: tuple[Path, ...] = (), max_bytes: int | None = None) -> Snapshot:
    """Stage a local file: opened read-only without following links below `roots`
    (`sources.confined`), refused over `max_bytes` or when sparse."""
    with open_regular(source, roots) as readable:
        if max_bytes is not None:
            check_size(readable, source.name, max_bytes)
        return snapshot_stream(readable, source.name, staging_dir, max_bytes)


def snapshot_stream(readable: BinaryIO, name: str, staging_dir: Path, max_bytes: int | None = None) -> Snapshot:
    """Stage any binary stream (a local file, an S3 body) under its checksum.

    The bytes go to a temporary file in `staging_dir` first, because the checksum, and so
    the final folder, is only known at the end; the rename is atomic, so a reader never
    sees a half-written snapshot and two workers staging the same version cannot clash.
    `max_bytes` bounds what is copied, whatever the source said its size was (a file can
    grow while it is read).
    """
    _check_plain_name(name)
    make_private_dir(staging_dir)
    fd, temp_name = tempfile.mkstemp(dir=staging_dir, prefix=".snapshot-", suffix=".partial")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            copied = _kernel_copy(readable, out, temp, max_bytes, name)
            sha256, size = copied or _copy_and_hash(readable, out, max_bytes, name)
        return Snapshot(_publish(temp, staging_dir / sha256 / name, sha256), sha256, size)
    finally:
        temp.unlink(missing_ok=True)


def _kernel_copy(
    readable: BinaryIO, out: BinaryIO, copy: Path, max_bytes: int | None, name: str
) -> tuple[str, int] | None:
    """The SHA-256 and size of what `copy_file_range` copied from a file into `copy`
    (`out`'s file); None where it cannot (a stream without a descriptor, another
    filesystem on an older kernel), before any byte.

    One thread hashes each range from the copy while the kernel copies the next: an 819
    MB snapshot took the copy plus 0.45 s of hashing one after the other."""
    try:
        source, target = readable.fileno(), out.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if not stat.S_ISREG(os.fstat(source).st_mode):  # an HTTP body's socket goes through its reader
        return None
    if readable.tell() != os.lseek(source, 0, os.SEEK_CUR):  # bytes already buffered by the reader
        return None
    digest = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        landed = stack.enter_context(copy.open("rb")).fileno()
        # a file of one range is hashed after it, here: a thread would cost a small file more than it saves
        several = os.fstat(source).st_size > KERNEL_COPY_BYTES
        hasher = stack.enter_context(ThreadPoolExecutor(1, "snapshot-hash")) if several else None
        hashed: list[Future[None]] = []  # one worker: the ranges are hashed in order
        while True:
            try:
                copied = os.copy_file_range(source, target, KERNEL_COPY_BYTES)
            except OSError as error:
                if size == 0 and error.errno in _NO_KERNEL_COPY:
                    return None
                raise
            if copied == 0:
                break
            if hasher is None:
                _hash_range(digest, landed, size, copied)
            else:
                hashed.append(hasher.submit(_hash_range, digest, landed, size, copied))
            size += copied
            if max_bytes is not None and size > max_bytes:
                raise UnsafeSourceError(f"{name}: more than MAX_FILE_BYTES ({max_bytes:,}) bytes")
        for done in hashed:
            done.result()
    return digest.hexdigest(), size


def _hash_range(digest: hashlib._Hash, fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        block = os.pread(fd, min(BLOCK_SIZE, end - offset), offset)
        if not block:
            raise OSError(errno.EIO, "the snapshot is shorter than what was copied into it")
        digest.update(block)
        offset += len(block)


def _copy_and_hash(
    readable: BinaryIO, out: BinaryIO | None, max_bytes: int | None = None, name: str = ""
) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for block in iter_blocks(readable):
        if max_bytes is not None and size + len(block) > max_bytes:
            raise UnsafeSourceError(f"{name}: more than MAX_FILE_BYTES ({max_bytes:,}) bytes")
        digest.update(block)
        if out is not None:
            out.write(block)
        size += len(block)
    return digest.hexdigest(), size


def _publish(temp: Path, target: Path, sha256: str) -> Path:
    """Move the temporary copy into place, unless an intact copy of this version is already there.

    An existing target is re-hashed rather than trusted: a crash or a disk error could
    have left it damaged, and a damaged snapshot would poison every later step.
    """
    make_private_dir(target.parent, tighten_existing=True)
    if target.is_file() and sha256_file(target) == sha256:
        return target
    os.replace(temp, target)
    return target


def _check_plain_name(name: str) -> None:
    """The name becomes a path component, so it must not be able to climb out of staging."""
    forbidden = ["/", "\0", os.sep, *([os.altsep] if os.altsep else [])]
    if name in ("", ".", "..") or any(char in name for char in forbidden):
        raise ValueError(f"snapshot name must be a plain file name, got {name!r}")
