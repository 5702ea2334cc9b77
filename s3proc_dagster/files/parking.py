"""Parking a failed file in the error directory, and bringing it back for a retry.

A file that fails for good is moved (never copied and deleted, never rewritten) to
`ERROR_DIRECTORY/<its path below WATCH_PATH>`, with `<name>.error.json` beside it saying
which step failed, why and in which run; the watched directory then holds only files
still to process. `unpark` is the inverse, for a manual retry. When the move itself is
impossible (a read-only or full error directory), the file stays where it is and the
caller records why on the file's record, so the user learns it from `s3proc status`.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from s3proc_dagster.errors import UnsafeSourceError
from s3proc_dagster.models import FileStatus, ProcessingStatus
from s3proc_dagster.sources.confined import confined_path, is_regular, move_below
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR, path_below, relative_to_watch

NOTE_SUFFIX = ".error.json"


def park(original: Path, watch: Path, error_dir: Path, note: dict[str, Any]) -> Path:
    """Move `original` into the error directory with its note; return where it went.

    Only a regular file below WATCH_PATH through real folders is moved, and only to below
    ERROR_DIRECTORY: a path a link leads out of either is refused (UnsafeSourceError), so
    no file elsewhere can be moved by naming it, nor by swapping a folder for a link while
    it is moved (`confined.move_below`). Raises OSError (PermissionError, a full disk...)
    when the move fails: the original is then untouched, since the note is written only
    after the move succeeded.
    """
    source = confined_path(original, watch)
    if source is None or not is_regular(source):
        raise UnsafeSourceError(f"{original}: not a regular file below WATCH_PATH; it is not moved")
    rel = source.relative_to(watch).as_posix()
    target = confined_path(error_dir / rel, error_dir)
    if target is None:
        raise UnsafeSourceError(f"{error_dir / rel}: a link in the error directory; {original} is not moved")
    if os.path.lexists(target) and (owner := _parked_for(target)) != note.get("fileId"):
        # another file's original (a landing zone parks in ERROR_DIRECTORY/<zone name>/, where
        # the default zone parks its folder of that name): the move replaced it, and it was lost
        raise UnsafeSourceError(
            f"{target} holds another file's parked original ({owner or 'no note says whose'}); "
            f"{original} is not moved, so neither is lost"
        )
    move_below(source, watch, target, error_dir)  # a rename, or a copy across filesystems: of this very file
    body = {**note, "failedAt": datetime.now(UTC).isoformat()}
    target.with_name(target.name + NOTE_SUFFIX).write_text(json.dumps(body, indent=2))
    return target


def _parked_for(parked: Path) -> str | None:
    """The fileId the note beside a parked file names, or None (no note, or unreadable)."""
    try:
        return json.loads(parked.with_name(parked.name + NOTE_SUFFIX).read_text()).get("fileId")
    except (OSError, ValueError, AttributeError):
        return None


def parked_location(path: Path, watch: Path, error_dir: Path) -> tuple[Path, Path]:
    """(where the file sits in the error directory, where it goes back to) for a user's path,
    which may name either place."""
    resolved = path.resolve()
    if resolved.is_relative_to(error_dir.resolve()):
        rel = resolved.relative_to(error_dir.resolve())
    else:
        rel = relative_to_watch(resolved, watch)
    return error_dir / rel, watch / rel


def parked_path(record: FileStatus, watch: Path, error_dir: Path) -> str | None:
    """Where a FAILED record's file waits in the error directory now, or None when it is not
    parked (not FAILED, not from below WATCH_PATH, or left in place because the move failed).

    The record keeps the path the file was read from, which is where a retry brings it
    back; this is where it is meanwhile. An archive entry is parked with its archive
    (`<parked archive>!/<entry>`). Only a FAILED record, and only while nothing is back at
    its path: a file there is the one a retry runs, leaving the parked copy alone (a new
    version dropped at the same path must not be overwritten by the old one).
    """
    if record.status is not ProcessingStatus.FAILED:
        return None
    archive, sep, entry = record.file_path.partition(ENTRY_SEPARATOR)
    rel = None if "://" in archive else path_below(archive, watch)
    if rel is None or os.path.lexists(archive) or not is_regular(error_dir / rel):
        return None
    return f"{error_dir / rel}{sep}{entry}"


def unpark(path: Path, watch: Path, error_dir: Path) -> Path:
    """Bring a parked file back to the watched directory (a no-op if it is not parked).

    Both ends are confined as in `park`: a link planted in the watched directory, before
    or while it is moved, cannot make the file land outside it."""
    parked, home = parked_location(path, watch, error_dir)
    if parked.exists():
        source, target = confined_path(parked, error_dir), confined_path(home, watch)
        if source is None or target is None or not is_regular(source):
            raise UnsafeSourceError(f"{home}: a link on the way in or out; {parked} stays where it is")
        try:
            move_below(source, error_dir, target, watch)
        except UnsafeSourceError as exc:
            raise UnsafeSourceError(f"{exc}; {parked} stays where it is") from None
        source.with_name(source.name + NOTE_SUFFIX).unlink(missing_ok=True)
    return home
