"""File metadata (seed 000's `metadata`: source, campaignId, priority, ...).

Local files carry it in a sidecar `<file name>.meta.json`; S3 objects in their user
metadata. Either way it lands in FileStatus.metadata, in run tags (`s3proc/<key>`), and
`priority` becomes the run's `dagster/priority`, so the run queue starts urgent files first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from s3proc_dagster.errors import UnsupportedFileError
from s3proc_dagster.sources.watch import SIDECAR_SUFFIX

PRIORITIES = {"high": 10, "normal": 0, "low": -10}
_TAG_KEY = re.compile(r"[^A-Za-z0-9_.\-]")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar's JSON object, {} when there is none; a malformed one is an error that
    names it, so the user knows which file to fix."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedFileError(f"{sidecar.name}: metadata sidecar is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UnsupportedFileError(f"{sidecar.name}: metadata sidecar must be a JSON object")
    return data


def priority_value(metadata: dict[str, Any]) -> int:
    raw = str(metadata.get("priority", "normal")).strip().lower()
    if raw in PRIORITIES:
        return PRIORITIES[raw]
    try:
        return max(-100, min(100, int(raw)))
    except ValueError:
        return 0


def run_tags(metadata: dict[str, Any]) -> dict[str, str]:
    tags = {f"s3proc/{_TAG_KEY.sub('_', str(k))}": str(v)[:200] for k, v in metadata.items()}
    if "priority" in metadata:
        tags["dagster/priority"] = str(priority_value(metadata))
    return tags
