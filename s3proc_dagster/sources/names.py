"""Which relative paths a source may have: one spelling per file, never into another's key space.

A file's relative path (below the watched directory or the S3 incoming prefix) becomes
its output key, its fileId and its asset key, so it is checked before anything is
written, and a path that fails is the file's FAILED reason:

- **Canonical**: no control character (a newline in a key would add a line to the
  symlink manifest, which query engines read as one more data file), no `.` or `..`
  component, no leading `/`, no empty component (`a//b.csv`), so two spellings never
  name one file and a key never climbs out of the prefix.
- **Not inside another file's dataset**: a tabular file `x.csv` becomes the dataset
  folder `x.csv/`, an archive `a.zip` the folder of its entries. A file below a folder
  named like one (`x.csv/y.csv`) would land inside that dataset, so it is refused.
- **Not in the product's own key space**: step outputs and image outputs live under
  reserved top-level folders of the prefix (`reserved`), which no source may map into.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from s3proc_dagster.errors import UnsafeSourceError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The suffixes whose files become folders in S3 (datasets and archives' entries); the
# same claims as `files.detect`'s, repeated here so checking a name loads no detector.
FOLDER_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".xml", ".zip", ".tar", ".tar.gz", ".tgz", ".gz")


def becomes_folder(name: str) -> bool:
    """Whether a file of this name becomes a folder of objects in S3 (a dataset or an archive's entries)."""
    lowered = name.lower()
    return any(lowered.endswith(s) and len(lowered) > len(s) for s in FOLDER_SUFFIXES)


def check_canonical(relative_path: str, what: str = "path") -> str:
    """`relative_path` unchanged if it is one canonical spelling; else UnsafeSourceError."""
    shown = repr(relative_path)
    if not relative_path:
        raise UnsafeSourceError(f"{what} is empty")
    if _CONTROL.search(relative_path):
        raise UnsafeSourceError(f"{what} {shown} contains a control character (newline, tab, NUL...)")
    if relative_path.startswith("/"):
        raise UnsafeSourceError(f"{what} {shown} starts with '/'")
    parts = relative_path.split("/")
    if "" in parts:
        raise UnsafeSourceError(f"{what} {shown} has an empty component ('//' or a trailing '/')")
    if "." in parts or ".." in parts:
        raise UnsafeSourceError(f"{what} {shown} has a '.' or '..' component")
    return relative_path


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


def check_source_path(relative_path: str, reserved: tuple[str, ...] = ()) -> str:
    """Every rule of this module for a source's relative path; `reserved` are top-level
    folders of the output prefix that belong to the product."""
    check_canonical(relative_path)
    check_not_nested(relative_path)
    top = relative_path.split("/", 1)[0]
    if top in reserved:
        raise UnsafeSourceError(
            f"{relative_path!r}: {top}/ is reserved for the product's own objects; no source may land there"
        )
    return relative_path
