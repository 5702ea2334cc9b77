"""Which files in the watched directory are new, changed and stable: a scan per look.

The cursor is small by construction: a high-water mark of change times already handled,
the few paths handled exactly at that mark, and the files still waiting to become
stable. It never lists every file seen, so a tick's cost is one `scandir` walk plus work
proportional to what changed, however long the directory's history.

A file's change time is max(mtime, ctime): `mv` and `cp -p` keep an old mtime but always
set a new ctime, so moved-in files are not missed.
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
    at_mark: list[str] = field(default_factory=list)
    # relative path -> [size, mtime_ns, first time seen with that size/mtime (ms)]
    waiting: dict[str, list[int]] = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps({"hwm": self.high_water_ns, "at": self.at_mark, "wait": self.waiting}, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | None) -> WatchCursor | None:
        if not raw:
            return None
        data = json.loads(raw)
        return cls(data.get("hwm", 0), data.get("at", []), data.get("wait", {}))


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
                    change_ns=max(st.st_mtime_ns, st.st_ctime_ns),
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
            at = sorted(f.relative_path for f in files if f.change_ns == top)
            return [], WatchCursor(high_water_ns=top, at_mark=at)

    ready: list[SeenFile] = []
    waiting: dict[str, list[int]] = {}
    at_mark = set(cursor.at_mark)
    for f in files:
        is_new = f.change_ns > cursor.high_water_ns or (
            f.change_ns == cursor.high_water_ns and f.relative_path not in at_mark
        )
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

    hwm = max([cursor.high_water_ns, *(f.change_ns for f in ready)])
    done_at = {f.relative_path for f in ready if f.change_ns == hwm}
    if hwm == cursor.high_water_ns:
        done_at |= at_mark
    return ready, WatchCursor(high_water_ns=hwm, at_mark=sorted(done_at), waiting=waiting)


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
