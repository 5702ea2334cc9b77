"""Which relative paths a source may have: one spelling per file, never into another's key space.

A file's relative path (below the watched directory or the S3 incoming prefix) becomes
its output key, its fileId and its asset key, so it is checked before anything is
written, and a path that fails is the file's FAILED reason:

- **Canonical**: valid UTF-8, no control character (a newline in a key would add a line to
  the symlink manifest, which query engines read as one more data file), no backslash
  (S3 servers and tools that read it as `/` would put the key elsewhere), no `.` or `..`
  component, no leading `/`, no empty component (`a//b.csv`), so two spellings never
  name one file and a key never climbs out of the prefix.
- **Not inside another file's dataset**: a tabular file `x.csv` becomes the dataset
  folder `x.csv/`, an archive `a.zip` the folder of its entries. A file below a folder
  named like one (`x.csv/y.csv`) would land inside that dataset, so it is refused.
- **Not in the product's own key space**: step outputs and image outputs live under
  reserved top-level folders of the prefix (`reserved`), which no source may map into.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from pathlib import PurePosixPath

from s3proc_dagster.errors import UnsafeSourceError

# Characters a name must not hold: C0 and C1 controls, line and paragraph separators, and
# the invisible format characters (zero-width spaces, BOMs, tag characters, the direction
# marks and overrides that make `x\u202egnp.csv` display as `xcsv.png`): each makes a name
# read as another.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _refused_char(char: str) -> bool:
    return unicodedata.category(char) in _REFUSED_CATEGORIES


# The suffixes whose files become folders in S3 (datasets and archives' entries); the
# same claims as `files.detect`'s, repeated here so checking a name loads no detector.
FOLDER_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".xml", ".zip", ".tar", ".tar.gz", ".tgz", ".gz")


def becomes_folder(name: str) -> bool:
    """Whether a file of this name becomes a folder of objects in S3 (a dataset or an archive's entries)."""
    lowered = name.lower()
    return any(lowered.endswith(s) and len(lowered) > len(s) for s in FOLDER_SUFFIXES)


# An S3 key is at most 1024 bytes; a dataset adds `/v-<16 hex>/_rejected/part-00000.parquet`
# (48) to its path and S3_PREFIX stands before it. A longer path failed only at the upload,
# after its retries, as "KeyTooLongError"; refused here, it fails at once and says why.
MAX_PATH_BYTES = 900


def check_canonical(relative_path: str, what: str = "path") -> str:
    """`relative_path` unchanged if it is one canonical spelling; else UnsafeSourceError."""
    shown = repr(relative_path)
    if not relative_path:
        raise UnsafeSourceError(f"{what} is empty")
    if len(relative_path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafeSourceError(
            f"{what} {relative_path[:80]!r}... is over {MAX_PATH_BYTES} bytes, too long for an S3 key "
            "(1024 bytes with S3_PREFIX and the dataset's own folders); shorten its folders or name"
        )
    if any(map(_refused_char, relative_path)):
        raise UnsafeSourceError(
            f"{what} {shown} contains a control character or an invisible one (newline, tab, NUL, a zero-width space, a direction override...)"
        )
    if "\\" in relative_path:  # several S3 servers and tools take it for '/': it could climb into another key
        raise UnsafeSourceError(f"{what} {shown} contains a backslash; S3 servers may read it as '/'")
    if not utf8_name(relative_path):
        raise UnsafeSourceError(f"{what} {shown} is not valid UTF-8 (rename the file)")
    if relative_path.startswith("/"):
        raise UnsafeSourceError(f"{what} {shown} starts with '/'")
    parts = relative_path.split("/")
    if "" in parts:
        raise UnsafeSourceError(f"{what} {shown} has an empty component ('//' or a trailing '/')")
    if "." in parts or ".." in parts:
        raise UnsafeSourceError(f"{what} {shown} has a '.' or '..' component")
    return relative_path


def printable(text: str) -> str:
    """`text` for a terminal: a producer's control characters (an escape sequence in a file
    name) shown escaped, never sent to the terminal as they are."""
    return "".join(c.encode("unicode_escape").decode("ascii") if _refused_char(c) else c for c in text)


def utf8_name(text: str) -> bool:
    """Whether a name the file system gave back is valid UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a byte the file system gave back as a lone surrogate
        return False
    return True


def check_not_nested(relative_path: str, first_folder: int = 0) -> None:
    """Refuse a path with a folder named like a dataset or an archive (from `first_folder` on:
    an archive's entries live, by design, below the archive's own name)."""
    folders = PurePosixPath(relative_path).parts[first_folder:-1]
    for depth, folder in enumerate(folders, start=first_folder):
        if becomes_folder(folder):
            owner = "/".join(PurePosixPath(relative_path).parts[: depth + 1])
            raise UnsafeSourceError(
                f"{relative_path!r} would land inside the S3 folder of {owner!r} (a file named {folder!r} "
                "becomes a folder of objects); rename the folder"
            )


def check_source_path(
    relative_path: str, reserved: tuple[str, ...] = (), watched: Mapping[str, str] | None = None
) -> str:
    """Every rule of this module for a source's relative path; `reserved` are folders of the
    output prefix (`images`, `a/b`) that belong to the product; `watched` are folders of it
    that a landing zone takes its files from, by zone name ("" for all of the prefix):
    landing there, the output would come back in as that zone's file."""
    check_canonical(relative_path)
    check_not_nested(relative_path)
    for folder in reserved:
        if relative_path == folder or relative_path.startswith(folder + "/"):
            raise UnsafeSourceError(
                f"{relative_path!r}: {folder}/ is reserved for the product's own objects; no source may land there"
            )
    for folder, zone in (watched or {}).items():
        if not folder or relative_path == folder or relative_path.startswith(folder + "/"):
            raise UnsafeSourceError(
                f"{relative_path!r} would land in the S3 source of landing zone {zone!r}, which would take "
                "its output in as a new file (and delete or move it after success); give the zones "
                "destinations apart from every S3 source"
            )
    return relative_path
