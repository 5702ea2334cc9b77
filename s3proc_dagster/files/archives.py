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
- A tar is also charged for every byte tarfile reads from its decompressed stream,
  headers and padding included, not only for entry data. tarfile reads PAX and GNU
  long-name headers into memory itself, whole: a 115 KB .tar.gz of a 90 KB CSV with a
  64 MiB PAX comment took `s3proc process` to a peak of 429 MB, against 278 MB for the
  same CSV without it. Such a header is refused from its declared size before it is
  read (`max_header_bytes`), and sparse entries are refused outright: tarfile reads
  their maps into memory the same way.
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
import errno
import gzip
import os
import re
import shutil
import stat
import struct
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
_TAR_HEADER_KINDS = {
    tarfile.XHDTYPE: "PAX extended header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
    tarfile.XGLTYPE: "PAX global header",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
}


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
    # tarfile holds a PAX or GNU long-name header's payload in memory, whole, for as long as
    # it takes to read the entry after it. Real ones are a few hundred bytes to a few KB
    # (a path, times, a uid; `git archive` writes a 52-byte commit id), so 1 MiB refuses
    # nothing a tar tool writes and bounds what one entry's headers can cost.
    max_header_bytes: int = 1 * MiB


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
    bytes_read: int = 0  # of a tar's decompressed stream, headers and padding included
    global_header_bytes: int = 0  # PAX global headers stay in memory to the end of the archive
    entry_header_bytes: int = 0  # the extended headers of the entry being read
    written: list[tuple[str, int]] = field(default_factory=list)

    def fail(self, entry: str, why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"{self.archive_name}: entry {entry!r}: {why}")

    def fail_archive(self, why: str) -> UnsafeArchiveError:
        """For what happens between entries (tar headers, padding), which no entry name covers."""
        return UnsafeArchiveError(f"{self.archive_name}: {why}")

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

    def add_read(self, count: int) -> None:
        """Called for each read tarfile makes of the decompressed stream, after it, so the
        limits are overshot by one read (10 KiB) at most, and in memory only."""
        self.bytes_read = total = self.bytes_read + count
        if total > self.limits.max_total_bytes:
            raise self.fail_archive(
                f"tar stream is longer than {self.limits.max_total_bytes:,} bytes (max_total_bytes, which counts "
                f"tar headers and padding too); stopped after {self.bytes_read:,} bytes read"
            )
        if total > self.limits.ratio_min_bytes and total > self.limits.max_ratio * self.archive_size:
            raise self.fail_archive(
                f"tar stream expands to more than {self.limits.max_ratio:g} times the archive's "
                f"{self.archive_size:,} bytes (max_ratio, possible tar bomb); stopped after {self.bytes_read:,} bytes read"
            )

    def admit_tar_header(self, info: tarfile.TarInfo) -> None:
        """Called for each tar header block before tarfile reads what follows it.

        A header's payload is held until the entry it describes has been read, and chained
        headers (x, then L, then x ...) are held all at once, so the cap applies to their
        sum, plus the global headers, which are never released.
        """
        kind = _TAR_HEADER_KINDS.get(info.type)
        if kind is None:  # an entry: the headers that described it are released
            self.entry_header_bytes = 0
            return
        cap = self.limits.max_header_bytes
        where = f"{kind} (type {info.type.decode()!r}) at byte {info.offset:,}"
        if info.size > cap:
            raise self.fail_archive(
                f"{where} declares {info.size:,} bytes, over the {cap:,} allowed (max_header_bytes); real headers "
                "are a few KB, so the archive is damaged or hostile: recreate it with an ordinary tar tool"
            )
        held = self.global_header_bytes + self.entry_header_bytes + info.size
        if held > cap:
            raise self.fail_archive(
                f"{where}: headers held at once reach {held:,} bytes, over the {cap:,} allowed (max_header_bytes); "
                "real headers are a few KB, so the archive is damaged or hostile: recreate it with an ordinary tar tool"
            )
        if info.type == tarfile.XGLTYPE:
            self.global_header_bytes += info.size
        else:
            self.entry_header_bytes += info.size


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
        with contextlib.closing(members(archive, progress)) as entries:
            _extract_members(entries, work, progress)
        _replace_dir(work, dest)
    except _READ_ERRORS as exc:
        raise UnsupportedFileError(f"{archive.name}: cannot be read as {kind}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [ExtractedEntry(dest.joinpath(rel), rel, size) for rel, size in progress.written]


def _member_reader(kind: str) -> Callable[[Path, _Progress], Iterator[_Member]]:
    readers: dict[str, Callable[[Path, _Progress], Iterator[_Member]]] = {
        "zip": _zip_members,
        "tar": lambda archive, progress: _tar_members(archive, progress, gzipped=False),
        "tar.gz": lambda archive, progress: _tar_members(archive, progress, gzipped=True),
        "gz": lambda archive, progress: _gz_members(archive),
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
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
            # said of the entry, not of its staging path (which names nothing the user knows)
            raise progress.fail(member.name, "a name in its path is longer than the file system allows") from None


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
    """Stream one entry to disk, charging every block to the limits before writing it.

    Mode 0600 whatever the umask, as the snapshot it came from: an entry is the sender's
    data, not something for every account on the machine to read.
    """
    assert member.open is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with member.open() as source, os.fdopen(fd, "wb") as out:
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


def _zip_members(archive: Path, progress: _Progress) -> Iterator[_Member]:
    _count_zip_entries(archive, progress)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            yield _Member(info.filename, _zip_type(info), lambda info=info: _open_zip_entry(zf, info, archive.name))


_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # 46 bytes: signature ... name, extra, comment lengths


def _count_zip_entries(archive: Path, progress: _Progress) -> None:
    """Refuse a zip whose central directory lists more than `max_entries` entries, before
    zipfile reads it: ZipFile builds an object per listed entry, all at once, before the
    first one can be counted (a 27 MB zip of 300,000 empty entries took 162 MB), so the
    records are counted here first, one 46-byte header at a time. A directory that cannot
    be walked is left to zipfile, which says why it is not a zip."""
    limit = progress.limits.max_entries
    with archive.open("rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]  # the stdlib's own EOCD reader
        if end is None:
            return
        size = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        start = end[zipfile._ECD_LOCATION] - size  # type: ignore[attr-defined]  # as zipfile finds it, data prepended or not
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        if start < 0:
            return
        f.seek(start)
        listed = walked = 0
        while walked < size:
            head = f.read(_CENTRAL_HEADER.size)
            if len(head) < _CENTRAL_HEADER.size:
                return
            signature, name, extra, comment = _CENTRAL_HEADER.unpack(head)
            if signature != zipfile.stringCentralDir:  # type: ignore[attr-defined]
                return
            listed += 1
            if listed > limit:
                raise progress.fail_archive(
                    f"its central directory lists more than {limit} entries (max_entries); refused before reading them"
                )
            f.seek(name + extra + comment, os.SEEK_CUR)
            walked += _CENTRAL_HEADER.size + name + extra + comment


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


def _tar_members(archive: Path, progress: _Progress, gzipped: bool) -> Iterator[_Member]:
    """Stream mode (`r|`): one forward pass, no seeking back through a gzip stream.

    The gzip layer is opened here, not by tarfile, so that what tarfile reads is the
    decompressed stream itself and every byte of it passes `_CountedStream`.
    """
    with (
        gzip.open(archive, "rb") if gzipped else archive.open("rb") as raw,
        tarfile.open(fileobj=_CountedStream(raw, progress), mode="r|", tarinfo=_bounded_tar_info(progress)) as tf,
    ):
        for info in tf:
            yield _Member(
                info.name,
                _tar_type(info),
                lambda info=info: _open_tar_entry(tf, info),
                lambda root, info=info: tarfile.data_filter(info, str(root)),  # a second opinion
            )


class _CountedStream:
    """The decompressed tar stream, charging each read tarfile makes to the limits."""

    def __init__(self, raw: IO[bytes], progress: _Progress) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._progress.add_read(len(data))
        return data


def _bounded_tar_info(progress: _Progress) -> type[tarfile.TarInfo]:
    """A TarInfo class that asks `progress` before tarfile reads a header's payload.

    `_proc_member` is tarfile's documented hook for subclasses; it sees each header block
    with its declared size before anything after it is read. Sparse entries are refused
    there too: the GNU sparse header and the PAX sparse formats make tarfile read a map of
    any length into memory, and a data pipeline has no use for holes in its files.
    """

    def refuse_sparse(name: str) -> UnsafeArchiveError:
        return progress.fail(name, "is a sparse file; sparse entries are not extracted")

    class BoundedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise refuse_sparse(self.name)
            progress.admit_tar_header(self)
            return super()._proc_member(tf)

        def _proc_gnusparse_00(self, next: tarfile.TarInfo, *args: object) -> None:
            raise refuse_sparse(next.name)

        _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    return BoundedTarInfo


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
