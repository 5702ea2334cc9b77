"""File metadata (the file document's `metadata`: source, campaignId, priority, ...).

Local files carry it in a sidecar `<file name>.meta.json`; S3 objects in their user
metadata. Either way it lands in FileStatus.metadata and in run tags of its own
namespace (`s3proc.meta/<key>`), and `priority` becomes the run's `dagster/priority`, so
the run queue starts urgent files first. Metadata is the producer's, so it is data and
never identity: no key can reach the product's own tags (`s3proc/path`, `s3proc/file_id`,
...), which say where the file is and which the failure hook and recovery rely on. A
sidecar is bounded (bytes, keys, key length) and read without following links; any
failure to read it is that file's FAILED reason, never the sensor's.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

from s3proc_dagster.errors import UnsupportedFileError
from s3proc_dagster.models import ARCHIVE_FILE_ID
from s3proc_dagster.names import META_TAG
from s3proc_dagster.sources.confined import open_regular
from s3proc_dagster.sources.names import printable
from s3proc_dagster.sources.watch import SIDECAR_SUFFIX

PRIORITIES = {"high": 10, "normal": 0, "low": -10}
SIDECAR_MAX_BYTES = 64 * 1024  # a sidecar is a few fields; 64 KiB also bounds JSON nesting
MAX_KEYS = 32
MAX_KEY_CHARS = 64
MAX_TAG_VALUE_CHARS = 200
MAX_DEPTH = 8  # an object of lists of objects...: a few levels is all a file's metadata needs
_TAG_KEY = re.compile(r"[^A-Za-z0-9_.\-]")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path, roots: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The sidecar's JSON object, {} when there is none; anything wrong with it is an
    UnsupportedFileError that names it, so the user knows which file to fix."""
    sidecar = sidecar_path(path)
    try:
        with open_regular(sidecar, roots) as readable:
            raw = readable.read(SIDECAR_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except UnsupportedFileError as exc:
        raise UnsupportedFileError(f"metadata sidecar {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # a name of 246-255 bytes leaves no room for `.meta.json`:
            return {}  # no sidecar can exist, and the file itself is fine
        raise UnsupportedFileError(f"{sidecar.name}: metadata sidecar cannot be read ({exc.strerror or exc})") from None
    if len(raw) > SIDECAR_MAX_BYTES:
        raise UnsupportedFileError(f"{sidecar.name}: metadata sidecar is over {SIDECAR_MAX_BYTES:,} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UnsupportedFileError(f"{sidecar.name}: metadata sidecar is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise UnsupportedFileError(f"{sidecar.name}: metadata sidecar must be a JSON object")
    check_metadata(data, sidecar.name)
    return data


def check_metadata(metadata: dict[str, Any], where: str) -> None:
    """At most MAX_KEYS keys of at most MAX_KEY_CHARS characters (they become run tags),
    values nested at most MAX_DEPTH deep and SIDECAR_MAX_BYTES in all, all of it UTF-8,
    standard JSON and storable: it is kept in the file's record and in each step's output,
    which must be able to store it (a value 900 lists deep, or a lone surrogate, broke those
    writes; MongoDB refuses an integer beyond 64 bits and a NUL in a key, and SQLite kept
    NaN as null)."""
    if len(metadata) > MAX_KEYS:
        raise UnsupportedFileError(f"{where}: metadata has {len(metadata)} keys, at most {MAX_KEYS} are accepted")
    for key in metadata:
        if str(key).lower() == ARCHIVE_FILE_ID.lower():
            raise UnsupportedFileError(
                f"{where}: metadata key {key!r} is the product's own (an archive entry's link to its "
                "archive) and may not be set by a file's metadata"
            )
        if len(str(key)) > MAX_KEY_CHARS:
            raise UnsupportedFileError(
                f"{where}: metadata key {str(key)[:MAX_KEY_CHARS]!r}... is longer than {MAX_KEY_CHARS} characters"
            )
    if _depth(metadata) > MAX_DEPTH:
        raise UnsupportedFileError(f"{where}: metadata is nested more than {MAX_DEPTH} levels deep")
    unstorable = _unstorable(metadata)
    if unstorable:
        raise UnsupportedFileError(f"{where}: metadata holds {unstorable}, which the progress store cannot keep")
    try:
        size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsupportedFileError(f"{where}: metadata holds text that is not valid UTF-8 (a lone surrogate)") from None
    except ValueError:
        raise UnsupportedFileError(f"{where}: metadata holds NaN or Infinity, which is not JSON") from None
    if size > SIDECAR_MAX_BYTES:
        raise UnsupportedFileError(f"{where}: metadata is over {SIDECAR_MAX_BYTES:,} bytes")


def _depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (1 for an object of plain values)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:  # no need to walk further than what is refused
            stack.extend((child, level + 1) for child in children)
    return deepest


def _unstorable(value: Any) -> str | None:
    """What in `value` (already bounded in depth) a store cannot keep as it is, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any("\x00" in str(key) for key in item):
                return "a key with a NUL character"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and not -(2**63) <= item < 2**63:
            return "an integer beyond 64 bits"
    return None


def priority_value(metadata: dict[str, Any]) -> int:
    raw = str(metadata.get("priority", "normal")).strip().lower()
    if raw in PRIORITIES:
        return PRIORITIES[raw]
    try:
        return max(-100, min(100, int(raw)))
    except ValueError:
        return 0


def run_tags(metadata: dict[str, Any]) -> dict[str, str]:
    """`s3proc.meta/<key>` per key (values cut to MAX_TAG_VALUE_CHARS), and the bounded priority."""
    tags: dict[str, str] = {}
    for k, v in list(metadata.items())[:MAX_KEYS]:
        name = _TAG_KEY.sub("_", str(k))[:MAX_KEY_CHARS] or "_"
        key, n = f"{META_TAG}/{name}", 1
        while key in tags:  # `a b` and `a_b` spell one tag key: the second gets a number, not the first's place
            n += 1
            key = f"{META_TAG}/{name}_{n}"
        tags[key] = printable(str(v))[:MAX_TAG_VALUE_CHARS]
    if "priority" in metadata:
        tags["dagster/priority"] = str(priority_value(metadata))
    return tags
