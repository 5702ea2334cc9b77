"""What a file is: its name makes the claim, its first bytes must confirm it.

Trusting the extension alone would send a renamed PNG into the CSV converter or a text
file into the unzipper, and the failure would surface later as a confusing parser error.
Checking the magic number here turns that into one early `UnsupportedFileError` that
says which claim the content broke. Only the head of the file is read (8 KiB, plus the
first 512 decompressed bytes of a tar.gz), so detection costs the same for 1 KB and 1 TB.
"""

from __future__ import annotations

import codecs
import gzip
import mimetypes
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from s3proc_dagster.errors import UnsupportedFileError
from s3proc_dagster.models import FileType

HEAD_BYTES = 8 * 1024
TAR_BLOCK = 512

# Longest suffix first, so `x.tar.gz` is a tarball and not a gzip of something.
_KIND_BY_SUFFIX: tuple[tuple[str, str], ...] = (
    (".tar.gz", "tar.gz"),
    (".tgz", "tar.gz"),
    (".tar", "tar"),
    (".gz", "gz"),
    (".zip", "zip"),
    (".csv", "csv"),
    (".tsv", "tsv"),
    (".json", "json"),
    (".jsonl", "jsonl"),
    (".ndjson", "jsonl"),
    (".xml", "xml"),
)

_CONTENT_TYPE = {
    "zip": "application/zip",
    "tar": "application/x-tar",
    "tar.gz": "application/gzip",
    "gz": "application/gzip",
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
    "json": "application/json",
    "jsonl": "application/x-ndjson",
    "xml": "application/xml",
}

ARCHIVE_KINDS = frozenset({"zip", "tar", "tar.gz", "gz"})
#: The kinds that become Parquet datasets: the specification's "database" files
#: (FileType.DATABASE), called tabular everywhere in the code.
_TABULAR_KINDS = frozenset({"csv", "tsv", "json", "jsonl", "xml"})


def is_tabular(kind: str) -> bool:
    """Whether a file of this kind becomes a Parquet dataset: the one test of "tabular"."""
    return kind in _TABULAR_KINDS


@dataclass(frozen=True)
class Detection:
    file_type: FileType
    kind: str  # zip, tar, tar.gz, gz, csv, tsv, json, jsonl, xml or regular
    extension: str  # lower case with the dot ('.tar.gz', '.csv'); '' when the name has none
    content_type: str


def detect(path: Path, name: str | None = None) -> Detection:
    """Classify `path`; `name` is the file's real name when `path` is a staged copy."""
    name = name or path.name
    extension, kind = _claim(name)
    if kind == "regular":
        return Detection(FileType.REGULAR, kind, extension, _guess_content_type(name))
    head = _read_head(path)
    _confirm(path, name, extension, kind, head)
    file_type = FileType.ARCHIVE if kind in ARCHIVE_KINDS else FileType.DATABASE
    return Detection(file_type, kind, extension, _CONTENT_TYPE[kind])


def _claim(name: str) -> tuple[str, str]:
    lowered = name.lower()
    for suffix, kind in _KIND_BY_SUFFIX:
        if lowered.endswith(suffix) and len(lowered) > len(suffix):
            return suffix, kind
    return Path(lowered).suffix, "regular"


def _read_head(path: Path) -> bytes:
    with path.open("rb") as readable:
        return readable.read(HEAD_BYTES)


def _confirm(path: Path, name: str, extension: str, kind: str, head: bytes) -> None:
    """Raise with the exact broken claim; return quietly when the content fits the name."""
    if not head:
        raise UnsupportedFileError(f"{name}: file is empty")
    problem = _archive_problem(path, kind, head) if kind in ARCHIVE_KINDS else _text_problem(kind, head)
    if problem:
        raise UnsupportedFileError(f"{name}: named {extension} but {problem}")


def _archive_problem(path: Path, kind: str, head: bytes) -> str | None:
    if kind == "zip" and not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return f"is not a zip archive (starts with {head[:16]!r})"
    if kind in ("gz", "tar.gz") and not head.startswith(b"\x1f\x8b"):
        return f"is not gzip-compressed (starts with {head[:16]!r})"
    if kind == "tar" and not _is_tar_header(head):
        return f"is not a tar archive (starts with {head[:16]!r})"
    if kind == "tar.gz":
        return _tar_inside_gzip_problem(path)
    return None


def _tar_inside_gzip_problem(path: Path) -> str | None:
    """A .tgz is two claims (gzip, then tar); the second costs one decompressed block to check."""
    try:
        with gzip.open(path, "rb") as inner:
            block = inner.read(TAR_BLOCK)
    except (OSError, EOFError, zlib.error) as exc:
        return f"its gzip data cannot be read ({exc})"
    if not _is_tar_header(block):
        return f"its gzip data holds no tar archive (starts with {block[:16]!r})"
    return None


def _is_tar_header(block: bytes) -> bool:
    """POSIX and GNU tar both put `ustar` at offset 257; an empty tar is only zero blocks."""
    return block[257:262] == b"ustar" or (len(block) >= TAR_BLOCK and not any(block[:TAR_BLOCK]))


def _text_problem(kind: str, head: bytes) -> str | None:
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"content is binary (NUL byte at offset {nul})"
    # A head cut at 8 KiB may end inside a multibyte character: only a complete read is final.
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(head, final=len(head) < HEAD_BYTES)
    except UnicodeDecodeError as exc:
        return f"content is not UTF-8 text (byte {head[exc.start]:#04x} at offset {exc.start}); re-save it as UTF-8"
    return _shape_problem(kind, text.lstrip("\ufeff \t\r\n"))


def _shape_problem(kind: str, text: str) -> str | None:
    """JSON and XML announce themselves in their first character; CSV and TSV cannot."""
    expected = {"json": "[{", "jsonl": "[{", "xml": "<"}.get(kind)
    if expected is None:
        return None
    label = "XML" if kind == "xml" else "JSON"
    if not text:
        return f"does not look like {label} (only whitespace)"
    if text[0] not in expected:
        return f"does not look like {label} (starts with {text[:16]!r})"
    return None


@lru_cache(maxsize=1)
def _mime_table() -> mimetypes.MimeTypes:
    """Python's built-in table, not the host's /etc/mime.types: the same answer on every worker."""
    return mimetypes.MimeTypes()


def _guess_content_type(name: str) -> str:
    return _mime_table().guess_type(name, strict=False)[0] or "application/octet-stream"
