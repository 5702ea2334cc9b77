"""Which files in the watched directory are new, changed and stable: a scan per look.

The cursor is small by construction: a high-water mark of change times already handled,
the files handled at or above it (with their change time), and the files still waiting
to become stable. It never lists every file seen, so a look's cost is one `scandir` walk
plus work proportional to what changed, however long the directory's history.

The mark trails one look behind: it moves to the newest change time the *previous* look
saw. A file renamed in while a walk is under way may be missed by that walk (readdir
promises nothing about entries added meanwhile) although the walk saw files renamed in
after it; with the mark at the newest change it saw, the missed file would be older than
the mark and never requested. Everything changed before the previous look ended is in
the next walk, so a mark that trails by one look passes no file unseen (measured: 51 of
300 files renamed in at once were lost when looks came every 100 ms).

A file's change time is its ctime, which the kernel sets on every write, rename and
`utime`: `mv` and `cp -p` keep an old mtime but set a new ctime, and no producer can set
it ahead (an mtime in the year 3000 would otherwise move the mark past every file after it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IN_PROGRESS_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp")
SIDECAR_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class SeenFile:
    path: Path
    relative_path: str
    size: int
    mtime_ns: int
    change_ns: int

    @property
    def run_key(self) -> str:
        """One run per file version: the same path, size and mtime never run twice."""
        return f"{self.relative_path}:{self.size}:{self.mtime_ns}"


@dataclass
class WatchCursor:
    high_water_ns: int = 0
    # relative path -> change time, of the files handled at or above the mark
    recent: dict[str, int] = field(default_factory=dict)
    # the newest change time the last look saw: the mark, one look later
    seen_ns: int = 0
    # relative path -> [size, mtime_ns, first time seen with that size/mtime (ms)]
    waiting: dict[str, list[int]] = field(default_factory=dict)

    def dumps(self) -> str:
        document = {"hwm": self.high_water_ns, "recent": self.recent, "seen": self.seen_ns, "wait": self.waiting}
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | None) -> WatchCursor | None:
        if not raw:
            return None
        data = json.loads(raw)
        hwm = data.get("hwm", 0)
        # a cursor written before `recent`: its files handled exactly at the mark
        recent = data.get("recent") or dict.fromkeys(data.get("at", []), hwm)
        return cls(hwm, recent, data.get("seen", hwm), data.get("wait", {}))


def is_ignored_name(name: str) -> bool:
    """Hidden files, editors' and downloaders' in-progress names, and metadata sidecars."""
    return (
        name.startswith(".")
        or name.endswith("~")
        or name.lower().endswith(IN_PROGRESS_SUFFIXES)
        or name.endswith(SIDECAR_SUFFIX)
    )


def scan(root: Path, skip_dirs: tuple[Path, ...] = ()) -> list[SeenFile]:
    """Every candidate regular file under `root`, skipping hidden dirs and `skip_dirs`."""
    skip = {str(p.resolve()) for p in skip_dirs}
    found: list[SeenFile] = []
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue  # vanished or unreadable: the next tick sees it again
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                if str(Path(entry.path).resolve()) not in skip:
                    stack.append(Path(entry.path))
                continue
            if not entry.is_file(follow_symlinks=False) or is_ignored_name(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            found.append(
                SeenFile(
                    path=Path(entry.path),
                    relative_path=Path(entry.path).relative_to(root).as_posix(),
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    change_ns=st.st_ctime_ns,
                )
            )
    return found


def evaluate(
    files: list[SeenFile],
    cursor: WatchCursor | None,
    now_ms: int,
    stability_threshold_ms: int,
    ignore_initial: bool,
) -> tuple[list[SeenFile], WatchCursor]:
    """Decide which files to request now; return them and the next cursor."""
    if cursor is None:
        cursor = WatchCursor()
        if ignore_initial:
            top = max((f.change_ns for f in files), default=0)
            at = {f.relative_path: f.change_ns for f in files if f.change_ns == top}
            return [], WatchCursor(high_water_ns=top, recent=at, seen_ns=top)

    ready: list[SeenFile] = []
    waiting: dict[str, list[int]] = {}
    for f in files:
        handled = cursor.recent.get(f.relative_path) == f.change_ns
        is_new = f.change_ns >= cursor.high_water_ns and not handled
        if not is_new and f.relative_path not in cursor.waiting:
            continue
        previous = cursor.waiting.get(f.relative_path)
        if previous is not None and previous[0] == f.size and previous[1] == f.mtime_ns:
            since = previous[2]
        else:
            # Unchanged since its mtime at least: a file moved in whole (`mv`, rsync's rename)
            # or written long before this tick is stable at first sight, not one tick later.
            # A writer still at work bumps the mtime, so it keeps waiting; a copy that sets an
            # old mtime (`cp -p`) does so only after the last byte.
            since = min(now_ms, f.mtime_ns // 1_000_000)
        if now_ms - since >= stability_threshold_ms:
            ready.append(f)
        else:
            waiting[f.relative_path] = [f.size, f.mtime_ns, since]

    hwm = max(cursor.high_water_ns, cursor.seen_ns)  # what the previous look saw (module docstring)
    handled_now = {**cursor.recent, **{f.relative_path: f.change_ns for f in ready}}
    recent = {path: change for path, change in sorted(handled_now.items()) if change >= hwm}
    seen = max((f.change_ns for f in files if f.relative_path not in waiting), default=cursor.seen_ns)
    return ready, WatchCursor(high_water_ns=hwm, recent=recent, seen_ns=max(seen, hwm), waiting=waiting)


def wait_for_ready(
    look: Callable[[], list[SeenFile]],
    budget_s: float,
    interval_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[SeenFile]:
    """`look` again every `interval_s` until files are ready or `budget_s` is spent; once
    some are, until a look finds no more, so a drop of many files is asked for together
    (and batched under a backlog, `runs.batching`) rather than as its first few.

    Dagster evaluates a sensor at most once per 5-second daemon loop, whatever its interval,
    so a tick that only looked once would leave a file waiting 2.5 s on average before its
    run is even asked for. A tick that keeps looking for most of the loop asks within
    `interval_s` of the file being ready. The interval stretches to ten times what one look
    costs, so a big directory is never walked more than a tenth of the time."""
    found: list[SeenFile] = []
    deadline = clock() + budget_s
    while (left := deadline - clock()) > 0:
        sleep(min(interval_s, left))
        started = clock()
        ready = look()
        interval_s = max(interval_s, 10 * (clock() - started))
        if ready:
            found += ready
        elif found:
            break
    return found
