"""Unpack zip, tar, tar.gz and gz archives without trusting anything they say.

An archive is input from strangers, so extraction is written as a filter, not a copy:

- Each entry's name is checked before the entry touches the disk: no `..`, no absolute
  POSIX or Windows paths (backslashes count as separators, so `..\\evil` is caught too),
  no two entries with the same path. Tar entries then also pass tarfile's own "data"
  filter, as a second opinion.
- All links are rejected, symbolic and hard, even ones that would stay inside. Telling a
  harmless link from a harmful one needs the final tree and the order of entries; refusing
  them all is simple and loses nothing a data pipeline needs. Device files and FIFOs are
  rejected too.
- Limits (`ExtractionLimits`) are enforced on the bytes actually written, block by block,
  never on sizes declared in headers, which a zip bomb is free to lie about. Extraction
  stops within one 1 MiB block of the limit.
- Everything is written to a hidden sibling of `dest` and renamed into place only when the
  whole archive succeeded: a failure leaves no partial files, and a re-run (an op retry)
  replaces the earlier result whole. `dest` therefore belongs to the extraction.
- macOS junk (`__MACOSX/` folders, `.DS_Store`, `._*` AppleDouble files) is skipped: it
  is Finder metadata, not data, and would otherwise turn up as unreadable entries.
- Zip entries must be stored or deflated: Python's bzip2 and LZMA zip readers inflate a
  whole compressed read in memory with no output bound, so they cannot be streamed safely.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from s3proc_dagster.errors import UnsafeArchiveError, UnsupportedFileError
from s3proc_dagster.files.checksum import iter_blocks

GiB = 1 << 30
MiB = 1 << 20

EntryType = Literal["file", "dir", "link", "special"]

_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_MACOS_JUNK_FOLDER = "__MACOSX"
_READ_ERRORS = (zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class ExtractionLimits:
    """Bounds on what one archive may cost.

    `max_ratio` is bytes written over the archive's size. It only applies past
    `ratio_min_bytes`: a tiny zip of a repetitive CSV legitimately exceeds any ratio, and
    a few MiB hurt nobody; what a ratio must catch is a bomb on its way to gigabytes.
    """

    max_total_bytes: int = 10 * GiB
    max_entries: int = 10_000
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1 * MiB


@dataclass(frozen=True)
class ExtractedEntry:
    path: Path
    relative_path: str  # posix, the archive's inner structure
    size: int


@dataclass(frozen=True)
class _Member:
    """One entry, seen the same way whatever the archive format, so the checks exist once."""

    name: str
    type: EntryType
    open: Callable[[], IO[bytes]] | None = None
    stdlib_check: Callable[[Path], None] = lambda root: None


@dataclass
class _Progress:
    """What this extraction has cost so far, and the one place that says no."""

    archive_name: str
    archive_size: int
    limits: ExtractionLimits
    entries: int = 0
    bytes_written: int = 0
    written: list[tuple[str, int]] = field(default_factory=list)

    def fail(self, entry: str, why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.archive_name}: entry {entry!r}: {why}")

    def count_entry(self, entry: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise self.fail(entry, f"archive has more than {self.limits.max_entries} entries (max_entries)")

    def add_bytes(self, entry: str, count: int) -> None:
        """Called before each block is written, so a limit is never overshot on disk."""
        total = self.bytes_written + count
        if total > self.limits.max_total_bytes:
            raise self.fail(
                entry,
                f"archive expands to more than {self.limits.max_total_bytes:,} bytes (max_total_bytes); "
                f"stopped after {self.bytes_written:,} bytes written",
            )
        if total > self.limits.ratio_min_bytes and total > self.limits.max_ratio * self.archive_size:
            raise self.fail(
                entry,
                f"archive expands to more than {self.limits.max_ratio:g} times its {self.archive_size:,} bytes "
                f"(max_ratio, possible zip bomb); stopped after {self.bytes_written:,} bytes written",
            )
        self.bytes_written = total


def extract(
    archive: Path, kind: str, dest: Path, limits: ExtractionLimits = ExtractionLimits()
) -> list[ExtractedEntry]:
    """Unpack `archive` (kind zip, tar, tar.gz or gz) into `dest`; return its files in archive order.

    Directories are created but not returned: callers process files. A gz holds one
    file, named as the archive without `.gz`.
    """
    members = _member_reader(kind)
    progress = _Progress(archive.name, archive.stat().st_size, limits)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with contextlib.closing(members(archive)) as entries:
            _extract_members(entries, work, progress)
        _replace_dir(work, dest)
    except _READ_ERRORS as exc:
        raise UnsupportedFileError(f"{archive.name}: cannot be read as {kind}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [ExtractedEntry(dest.joinpath(rel), rel, size) for rel, size in progress.written]


def _member_reader(kind: str) -> Callable[[Path], Iterator[_Member]]:
    readers: dict[str, Callable[[Path], Iterator[_Member]]] = {
        "zip": _zip_members,
        "tar": lambda archive: _tar_members(archive, "r|"),
        "tar.gz": lambda archive: _tar_members(archive, "r|gz"),
        "gz": _gz_members,
    }
    if kind not in readers:
        raise ValueError(f"not an archive kind: {kind!r} (expected one of {', '.join(readers)})")
    return readers[kind]


def _extract_members(members: Iterator[_Member], root: Path, progress: _Progress) -> None:
    for member in members:
        progress.count_entry(member.name)
        parts = _safe_parts(member, progress)
        if not parts or _is_macos_junk(parts):
            continue
        _refuse_links_and_devices(member, root, progress)
        target = root.joinpath(*parts)
        try:
            if member.type == "dir":
                target.mkdir(parents=True, exist_ok=True)
            else:
                size = _write_file(member, target, progress)
                progress.written.append(("/".join(parts), size))
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise progress.fail(member.name, "clashes with another entry of the same path") from None


def _safe_parts(member: _Member, progress: _Progress) -> tuple[str, ...]:
    """The entry's path components, or an error if the name could land outside `dest`."""
    name = member.name.replace("\\", "/")
    if "\x00" in name:
        raise progress.fail(member.name, "name contains a NUL byte")
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise progress.fail(member.name, "absolute path (entries must be relative)")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise progress.fail(member.name, "path contains '..' and would escape the extraction folder")
    if not parts and member.type != "dir":
        raise progress.fail(member.name, "empty file name")
    return parts


def _is_macos_junk(parts: tuple[str, ...]) -> bool:
    return _MACOS_JUNK_FOLDER in parts or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


def _refuse_links_and_devices(member: _Member, root: Path, progress: _Progress) -> None:
    if member.type == "link":
        raise progress.fail(member.name, "is a link; links are never extracted")
    if member.type == "special":
        raise progress.fail(member.name, "is a device file or FIFO; only files and folders are extracted")
    try:
        member.stdlib_check(root)
    except tarfile.FilterError as exc:
        raise progress.fail(member.name, f"refused by tarfile's data filter: {exc}") from None


def _write_file(member: _Member, target: Path, progress: _Progress) -> int:
    """Stream one entry to disk, charging every block to the limits before writing it."""
    assert member.open is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with member.open() as source, target.open("xb") as out:
        for block in iter_blocks(source):
            progress.add_bytes(member.name, len(block))
            out.write(block)
            size += len(block)
    return size


def _replace_dir(work: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(work, dest)


# ---- formats: each turns its entries into _Member, nothing more --------------------------------


def _zip_members(archive: Path) -> Iterator[_Member]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            yield _Member(info.filename, _zip_type(info), lambda info=info: _open_zip_entry(zf, info, archive.name))


def _zip_type(info: zipfile.ZipInfo) -> EntryType:
    """Zip has no entry types; Unix tools keep the file mode in the upper external attributes."""
    if info.is_dir():
        return "dir"
    mode = stat.S_IFMT(info.external_attr >> 16)
    if mode == stat.S_IFLNK:
        return "link"
    if mode in (0, stat.S_IFREG):
        return "file"
    return "dir" if mode == stat.S_IFDIR else "special"


def _open_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_name: str) -> IO[bytes]:
    if info.flag_bits & 0x1:
        raise UnsupportedFileError(f"{archive_name}: entry {info.filename!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsupportedFileError(
            f"{archive_name}: entry {info.filename!r} uses compression method {info.compress_type}; "
            "only stored and deflated entries can be extracted with bounded memory"
        )
    return zf.open(info)


def _tar_members(archive: Path, mode: Literal["r|", "r|gz"]) -> Iterator[_Member]:
    """Stream mode (`r|`): one forward pass, no seeking back through a gzip stream."""
    with tarfile.open(archive, mode) as tf:
        for info in tf:
            yield _Member(
                info.name,
                _tar_type(info),
                lambda info=info: _open_tar_entry(tf, info),
                lambda root, info=info: tarfile.data_filter(info, str(root)),  # a second opinion
            )


def _tar_type(info: tarfile.TarInfo) -> EntryType:
    if info.issym() or info.islnk():
        return "link"
    if info.isdir():
        return "dir"
    return "file" if info.isreg() else "special"


def _open_tar_entry(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    readable = tf.extractfile(info)
    assert readable is not None  # only regular members are opened
    return readable


def _gz_members(archive: Path) -> Iterator[_Member]:
    name = archive.name[:-3] if archive.name.lower().endswith(".gz") and len(archive.name) > 3 else archive.name
    yield _Member(name, "file", lambda: gzip.open(archive, "rb"))  # noqa: SIM115 - the caller closes what it opens
