"""The watch logic on a real directory: stability, high-water mark, ignores, cursor size."""

from __future__ import annotations

import os
import time
from pathlib import Path

from s3proc_dagster.sources.watch import SeenFile, WatchCursor, evaluate, scan


def write(path: Path, data: bytes = b"a,b\n1,2\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tick(
    root: Path, cursor: WatchCursor | None, now_ms: int, threshold: int = 0, ignore_initial: bool = False, skip=()
):
    ready, nxt = evaluate(scan(root, tuple(skip)), cursor, now_ms, threshold, ignore_initial)
    return sorted(f.relative_path for f in ready), nxt


def test_file_is_requested_only_once_stable_and_then_never_again(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv")
    ready, cur = tick(tmp_path, None, now_ms=1000, threshold=2000)
    assert ready == [] and "a.csv" in cur.waiting
    with f.open("ab") as out:  # still being written: size changes, the clock restarts
        out.write(b"3,4\n")
    ready, cur = tick(tmp_path, cur, now_ms=2500, threshold=2000)
    assert ready == []
    ready, cur = tick(tmp_path, cur, now_ms=4600, threshold=2000)
    assert ready == ["a.csv"] and cur.waiting == {}
    ready, cur = tick(tmp_path, cur, now_ms=9000, threshold=2000)
    assert ready == []


def test_modified_file_is_requested_again_with_a_new_run_key(tmp_path: Path) -> None:
    f = write(tmp_path / "d/a.csv")
    first, cur = evaluate(scan(tmp_path), None, 0, 0, False)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    f.write_bytes(b"a,b\n9,9\n9,9\n")
    second, cur = evaluate(scan(tmp_path), cur, 10, 0, False)
    assert [x.relative_path for x in second] == ["d/a.csv"]
    assert second[0].run_key != first[0].run_key


def test_ignore_initial_skips_what_is_there_at_the_first_tick(tmp_path: Path) -> None:
    write(tmp_path / "old.csv")
    ready, cur = tick(tmp_path, None, 0, ignore_initial=True)
    assert ready == []
    write(tmp_path / "new.csv")
    ready, cur = tick(tmp_path, cur, 10, ignore_initial=True)
    assert ready == ["new.csv"]


def test_temp_hidden_sidecar_and_skipped_directories_are_ignored(tmp_path: Path) -> None:
    for name in ("x.part", "x.tmp", "x.crdownload", "x.csv~", ".hidden.csv", "x.csv.meta.json", ".git/config"):
        write(tmp_path / name)
    write(tmp_path / "errors/bad.csv")
    write(tmp_path / "keep/ok.csv")
    ready, _ = tick(tmp_path, None, 0, skip=[tmp_path / "errors"])
    assert ready == ["keep/ok.csv"]


def test_moved_in_file_with_an_old_mtime_is_still_seen(tmp_path: Path) -> None:
    write(tmp_path / "first.csv")
    _, cur = tick(tmp_path, None, 0)
    outside = write(tmp_path.parent / f"{tmp_path.name}-outside.csv")
    os.utime(outside, (1_000_000, 1_000_000))  # 1970: far below the high-water mark
    os.rename(outside, tmp_path / "moved.csv")
    ready, _ = tick(tmp_path, cur, 10)
    assert ready == ["moved.csv"]


def test_cursor_stays_small_over_ten_thousand_files(tmp_path: Path) -> None:
    for i in range(10_000):
        (tmp_path / f"d{i % 50}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 50}" / f"f{i}.csv").write_bytes(b"x\n1\n")
    started = time.monotonic()
    ready, cur = tick(tmp_path, None, 0)
    elapsed = time.monotonic() - started
    assert len(ready) == 10_000
    again, cur2 = tick(tmp_path, cur, 10)
    assert again == []
    # the cursor holds the mark and the files at or above it, never the 10,000 names
    assert len(cur2.dumps()) < 2_000 + 60 * len(cur2.recent)
    assert len(cur2.recent) < 10_000
    print(f"10,000-file tick: {elapsed:.2f}s, cursor {len(cur2.dumps())} bytes")


def test_a_file_unchanged_for_longer_than_the_threshold_is_ready_at_first_sight(tmp_path: Path) -> None:
    now_ms = time.time_ns() // 1_000_000
    moved_in = write(tmp_path / "moved.csv")  # as `mv` leaves it: its mtime from long before
    os.utime(moved_in, ns=(time.time_ns(), (now_ms - 60_000) * 1_000_000))
    write(tmp_path / "fresh.csv")  # written just now: it may still be growing
    ready, cur = tick(tmp_path, None, now_ms=now_ms, threshold=2000)
    assert ready == ["moved.csv"]
    assert list(cur.waiting) == ["fresh.csv"]
    ready, cur = tick(tmp_path, cur, now_ms=now_ms + 2500, threshold=2000)
    assert ready == ["fresh.csv"] and cur.waiting == {}


def seen(name: str, change_ns: int) -> SeenFile:
    return SeenFile(Path("/w") / name, name, 1, change_ns, change_ns)


def test_a_file_a_walk_missed_while_it_was_renamed_in_is_requested_by_the_next_look() -> None:
    """readdir promises nothing about entries added during a walk: one walk can see `b.csv`
    (renamed in later) and miss `a.csv` (renamed in earlier). The mark trails a look
    behind, so `a.csv`, older than what that walk saw, is still new to the next one."""
    _, cursor = evaluate([], None, 0, 0, False)
    first, cursor = evaluate([seen("b.csv", 200)], cursor, 0, 0, False)
    second, cursor = evaluate([seen("a.csv", 100), seen("b.csv", 200)], cursor, 0, 0, False)
    third, cursor = evaluate([seen("a.csv", 100), seen("b.csv", 200)], cursor, 0, 0, False)
    assert [f.relative_path for f in first] == ["b.csv"]
    assert [f.relative_path for f in second] == ["a.csv"] and third == []  # each once
    assert cursor.high_water_ns == 200 and cursor.recent == {"b.csv": 200}


def test_an_mtime_set_far_ahead_does_not_blind_the_watch(tmp_path: Path) -> None:
    """A producer can set any mtime (`touch -d 3000-01-01`); the change time is the ctime,
    which it cannot, so the mark never jumps past the files that come after it."""
    future = write(tmp_path / "future.csv")
    os.utime(future, (32_503_680_000, 32_503_680_000))  # the year 3000
    first, cur = tick(tmp_path, None, 0)
    write(tmp_path / "next.csv")
    second, cur = tick(tmp_path, cur, 10)
    third, cur = tick(tmp_path, cur, 20)
    assert first == ["future.csv"] and second == ["next.csv"] and third == []


def test_a_cursor_from_before_recent_still_knows_the_files_at_its_mark() -> None:
    old = WatchCursor.loads('{"hwm":200,"at":["b.csv"],"wait":{}}')
    assert old is not None and old.recent == {"b.csv": 200} and old.seen_ns == 200
    again, _ = evaluate([seen("b.csv", 200), seen("c.csv", 200)], old, 0, 0, False)
    assert [f.relative_path for f in again] == ["c.csv"]
