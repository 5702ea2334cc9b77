"""One rule for naming a file: how a path relates to the watched directory, and which
progress records a user's argument names.

The store records a file by its `filePath` (an absolute local path, an `s3://` URI, or
`<archive path>!/<entry path>` for an archive entry) and its `fileId` (derived from the
path below WATCH_PATH or below the S3 incoming prefix, see `make_file_id`). Users see
other spellings: the relative path in run tags and asset keys (`nyc/flights.csv`), a
path relative to where they stand (`data/incoming/nyc/flights.csv`), or the file parked
in the error directory. Every spelling is turned into stored paths and fileIds here, so
`s3proc status`, `s3proc retry` and the Dagster layer agree on what a path means.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from s3proc_dagster.models import FileStatus, make_file_id

ENTRY_SEPARATOR = "!/"  # `<archive>!/<entry>`, as Java's jar: and zipfile URLs spell it


def path_below(path: Path | str, root: Path | str) -> str | None:
    """`path` relative to `root` as a POSIX string, or None when it is not below it.

    Both sides are resolved, so a symlinked checkout or a `..` in WATCH_PATH does not
    make a watched file look foreign."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def relative_to_watch(path: Path | str, watch_path: Path | str) -> str:
    """A file's path below the watched directory: its relative path in output keys,
    run tags, asset keys and its fileId.

    A file outside the watched directory (`s3proc process /tmp/x.csv`) is known by its
    name alone, so its outputs land at the top of the prefix rather than under a path
    made of `..` parts.
    """
    rel = path_below(path, watch_path)
    return rel if rel else Path(path).name


@dataclass(frozen=True)
class FileRef:
    """What one user argument can name: stored `filePath`s and `fileId`s.

    A relative argument is ambiguous (relative to the current directory, or to
    WATCH_PATH as run tags show it); both readings are kept, and a record matches
    when it matches either, which is what the user meant in every case we met.
    """

    text: str
    file_paths: frozenset[str]
    file_ids: frozenset[str]

    def matches(self, record: FileStatus) -> bool:
        return record.file_path in self.file_paths or record.file_id in self.file_ids


def _absolute(path: Path, cwd: Path) -> Path:
    """`path` made absolute against `cwd` (not the process's), `..` folded, symlinks kept."""
    return Path(os.path.normpath(cwd / path))


def _local_readings(
    text: str, watch_path: Path, cwd: Path, error_directory: Path | None
) -> list[tuple[Path, str | None]]:
    """Every absolute path `text` can name, each with its path below WATCH_PATH (if any)."""
    path = Path(text).expanduser()
    root = _absolute(watch_path, cwd)
    candidates = [_absolute(path, cwd)]
    if not path.is_absolute():
        candidates.append(_absolute(root / path, cwd))
    readings: list[tuple[Path, str | None]] = []
    for candidate in candidates:
        parked = path_below(candidate, _absolute(error_directory, cwd)) if error_directory is not None else None
        # a FAILED file waits in the error directory under its watched path
        named = root / parked if parked is not None else candidate
        readings.append((named, path_below(named, root)))
    return readings


def resolve_user_path(
    arg: str, watch_path: Path, cwd: Path, error_directory: Path | None = None, zone: str = ""
) -> FileRef:
    """The records a command-line argument names.

    Accepted: a fileId; an `s3://` URI; an absolute path; a path relative to `cwd`;
    a path relative to `watch_path` (as run tags and asset keys show it, which also
    finds a file that came by the S3 incoming prefix, since its fileId is derived from
    the same relative path); a path in `error_directory`, naming the file parked there;
    and any of these followed by `!/<entry path>` for an archive entry.

    `zone` is the landing zone `watch_path` and `error_directory` are those of: its
    files' ids carry its name (`make_file_id`), so the same relative path in two zones
    names two files, each found only through its own zone's reading.
    """
    file_paths: set[str] = {arg}
    file_ids: set[str] = {arg}
    outer, sep, entry = arg.partition(ENTRY_SEPARATOR)
    entry = PurePosixPath(entry).as_posix() if sep and entry else ""
    readings = [(outer, entry)] if entry else []
    readings.append((arg, ""))  # a literal "!" in a name is rare, but it is a valid name
    for text, inner in readings:
        if "://" in text:
            file_paths.add(f"{text}{ENTRY_SEPARATOR}{inner}" if inner else text)
            continue
        for absolute, rel in _local_readings(text, watch_path, cwd, error_directory):
            for spelling in {str(absolute), str(absolute.resolve())}:
                file_paths.add(f"{spelling}{ENTRY_SEPARATOR}{inner}" if inner else spelling)
            if rel is not None:
                file_ids.add(make_file_id(f"{rel}/{inner}" if inner else rel, zone))
    return FileRef(arg, frozenset(file_paths), frozenset(file_ids))
