"""The staging area: what a file version needs between its steps, and when it goes.

Layout under STAGING_DIRECTORY:

    <sha256>/<name>        the snapshot every step reads (one read of the source, checksummed)
    <sha256>.work/         what the steps derive from it: extracted entries, Parquet chunks
    .snapshot-*.partial    a snapshot being written (renamed into place when complete)

Retention: a version stays while a file that may still need it is IN_PROGRESS or FAILED
(a retry, or "Re-execute from failure" in the UI, starts from the staged snapshot and the
finished conversion). Once its file is COMPLETED the version is removed, at once by default
or after STAGING_RETENTION (a cache for reprocessing). `sweep` removes whatever no such
file refers to and is older than the grace period: a crash between a snapshot and its
claim, a superseded version, a partial snapshot of a killed run. Staging is a cache in any
case, local to each node: a step that finds a version missing takes the snapshot again from
the source, checked against the recorded SHA-256, and derives the rest from it
(`pipeline.staged_snapshot`, `staged_items`), so a re-execution may run on any node.

Privacy: the staging area holds copies of the users' files, so only the product's user
may read it. STAGING_DIRECTORY is created 0700 (an existing one keeps its mode: it may be
shared, the sweep leaves alone what is not ours), and so is every `<sha256>/` and
`<sha256>.work/` folder, tightened if an older version left it wider: a version's
contents are unreachable by others whatever the root's mode and whatever mode their
writers (pyarrow, DuckDB, the archive extraction) give them. Run workers also run under
a 077 umask (`runs/zygote.py`, `runs/launch.py`), which makes those files 0600 too.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from s3proc_dagster.files.private import make_private_dir
from s3proc_dagster.models import ProcessingStatus
from s3proc_dagster.stores.base import ProgressStore

WORK_SUFFIX = ".work"
PARTIAL_PREFIX = ".snapshot-"
SWEEP_GRACE_S = 3600.0  # younger entries may belong to a run that has not claimed its file yet


@dataclass(frozen=True)
class Swept:
    entries: int
    bytes: int


def version_of(checksum: str | None) -> str | None:
    """The staged version a record refers to: an archive entry's `<sha>:<path>` is its archive's."""
    return checksum.split(":", 1)[0] if checksum else None


def versions_in_use(store: ProgressStore) -> set[str]:
    """Staged versions a file may still need: those of files IN_PROGRESS or FAILED."""
    records = [*store.list_files(ProcessingStatus.IN_PROGRESS), *store.list_files(ProcessingStatus.FAILED)]
    return {v for r in records if (v := version_of(r.checksum))}


def work_dir(staging: Path, sha256: str) -> Path:
    """Where a version's extracted entries and Parquet chunks go: beside its snapshot
    (`<staging>/<sha256>/<name>`), never inside it, so no file name can collide."""
    return staging / f"{sha256}{WORK_SUFFIX}"


def private_work_dir(staging: Path, sha256: str) -> Path:
    """`work_dir`, made 0700 before anything is written into it (see Privacy above)."""
    return make_private_dir(work_dir(staging, sha256), tighten_existing=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> int:
    if not path.exists():
        return 0
    size = _size(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return size


def release(staging: Path, sha256: str, in_use: Iterable[str]) -> int:
    """Remove a version's snapshot and work unless a file still needing it uses it; bytes freed."""
    if sha256 in set(in_use):
        return 0
    return _remove(staging / sha256) + _remove(work_dir(staging, sha256))


def sweep(staging: Path, in_use: Iterable[str], older_than_s: float, now: float | None = None) -> Swept:
    """Remove every entry older than `older_than_s` that no file in use refers to."""
    if not staging.is_dir():
        return Swept(0, 0)
    keep = set(in_use)
    cutoff = (time.time() if now is None else now) - older_than_s
    entries = freed = 0
    for entry in os.scandir(staging):
        name = entry.name.removesuffix(WORK_SUFFIX)
        is_version = entry.is_dir(follow_symlinks=False) and len(name) == 64
        is_partial = entry.name.startswith(PARTIAL_PREFIX)
        if not (is_version or is_partial) or name in keep:
            continue  # not ours to judge (the images' temp files clean themselves)
        if entry.stat(follow_symlinks=False).st_mtime > cutoff:
            continue
        freed += _remove(Path(entry.path))
        entries += 1
    return Swept(entries, freed)
