"""The RunRequests a file gets, whoever asks: the sensors, `s3proc process`, `s3proc backfill`.

One rule for every entry point, so a run started from the command line looks exactly like
a sensor's (same job, config and tags) and the UI treats them alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from s3proc_dagster.images.request_csv import looks_like_request_csv
from s3proc_dagster.models import FileStatus, make_file_id
from s3proc_dagster.names import (
    CHECKSUM_OP,
    DEAD_TAG,
    DEFAULT_PRIORITY_TAG,
    IMAGE_REQUEST_JOB,
    KIND_TAG,
    PATH_TAG,
    PROCESS_FILE_JOB,
    RECONCILE_JOB,
    RETRY_TAG,
    VALIDATE_REQUEST_OP,
    ZONE_TAG,
)
from s3proc_dagster.runs.tags import file_run_tags
from s3proc_dagster.sources.confined import is_regular
from s3proc_dagster.sources.metadata import read_sidecar, run_tags
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR
from s3proc_dagster.sources.resolve import relative_key
from s3proc_dagster.transfer.keys import is_s3_uri, prefix_folder, split_uri

#: In every run config the product makes: the jobs' quiet console logger (`defs/loggers.py`).
CONSOLE_LOGGER = {"loggers": {"console": {}}}


def run_request_for(
    path: str,
    relative_path: str,
    run_key: str | None,
    file_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    roots: tuple[Path, ...] = (),
    zone: Mapping[str, str] | None = None,
) -> dg.RunRequest:
    """A product CSV (by its header, not its name) goes to image_request_job; any other
    file to process_file_job. File metadata becomes tags, `priority` the run's priority.
    A declared landing zone's file (`zone`: its settings by variable name) carries the
    zone's settings in its run's config, the zone's name in a tag and its priority.

    Whatever is wrong with the file or its sidecar (a link, an unreadable or hostile
    sidecar) is left to the file's own run, which fails with the reason: a request is
    always made, so one bad file never stops a sensor's tick for the others."""
    local = "://" not in path
    if path.lower().endswith(".csv") and local and is_regular(path) and looks_like_request_csv(Path(path), roots):
        return dg.RunRequest(
            run_key=run_key,
            job_name=IMAGE_REQUEST_JOB,
            run_config={"ops": {VALIDATE_REQUEST_OP: {"config": {"path": path}}}, **CONSOLE_LOGGER},
            tags={PATH_TAG: relative_path, KIND_TAG: "image_request", **run_tags(metadata or {})},
        )
    if metadata is None and local:
        try:
            metadata = read_sidecar(Path(path), roots)
        except Exception:
            metadata = {}  # the run fails on it with a message naming the sidecar
    zone = dict(zone or {})
    name = zone.get("ZONE_NAME", "")
    tags = file_run_tags(relative_path, path, file_id or make_file_id(relative_path, name), metadata)
    config: dict[str, Any] = {"path": path, "relative_path": relative_path}
    if name:
        config["zone"] = zone
        tags = {DEFAULT_PRIORITY_TAG: zone.get("ZONE_PRIORITY", "0"), **tags, ZONE_TAG: name}
    return dg.RunRequest(
        job_name=PROCESS_FILE_JOB,
        run_key=run_key,
        run_config={"ops": {CHECKSUM_OP: {"config": config}}, **CONSOLE_LOGGER},
        tags=tags,
    )


def _retry_stamp(status: FileStatus) -> str:
    return f"retry-{int(status.last_updated_at.timestamp() * 1000)}"


def _again(request: dg.RunRequest, status: FileStatus) -> dg.RunRequest:
    """A file that started before runs again in a run of its own, never in a batch: it was
    retried, recovered, or left a batch it kept failing in (`runs.batching.batchable`)."""
    return request.with_replaced_attrs(tags={**request.tags, RETRY_TAG: _retry_stamp(status)})


def requeued(store_files: list[FileStatus], root: Path, zone: Mapping[str, str] | None = None) -> list[dg.RunRequest]:
    """Files under `root` set back to PENDING after having started (manual retry, crash
    recovery, a run that died before it could claim its file).

    Run keys are permanent in Dagster, so such a file gets a new key carrying the time
    it was reset; new files never match (they have not started yet).
    """
    out = []
    for status in store_files:
        path = Path(status.file_path)
        if status.processing_started_at is None or is_s3_uri(status.file_path) or not is_regular(path):
            continue
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            continue
        st = path.stat()
        key = f"{rel}:{st.st_size}:{st.st_mtime_ns}:{_retry_stamp(status)}"
        out.append(_again(run_request_for(str(path), rel, key, status.file_id, roots=(root,), zone=zone), status))
    return out


def requeued_objects(
    store_files: list[FileStatus], bucket: str, prefix: str, zone: Mapping[str, str] | None = None
) -> list[dg.RunRequest]:
    """The same for objects under the S3 incoming prefix: S3 lists an object once per
    version, so a version whose run died would otherwise never be requested again."""
    root = prefix_folder(prefix)
    out = []
    for status in store_files:
        found = _object_of(status)
        if status.processing_started_at is None or found is None:
            continue
        object_bucket, key = found
        if object_bucket != bucket or not key.startswith(root):
            continue
        request = run_request_for(
            status.file_path,
            relative_key(key, prefix),
            f"s3:{key}:{_retry_stamp(status)}",
            status.file_id,
            metadata=status.metadata,
            zone=zone,
        )
        out.append(_again(request, status))
    return out


def _object_of(status: FileStatus) -> tuple[str, str] | None:
    """(bucket, key) of a recorded object: its source fields, or its `s3://` path when it
    failed before it was read (deleted since it was listed, unreadable, an `x-sha256` that
    is not its bytes'): such a record has no source fields, and a batch run it left set it
    back to PENDING all the same, where it stayed with no run for good."""
    if status.source_bucket and status.source_key:
        return status.source_bucket, status.source_key
    if is_s3_uri(status.file_path) and ENTRY_SEPARATOR not in status.file_path:
        return split_uri(status.file_path)
    return None


def recovery_request(dead_claims: list[FileStatus], dead_runs: list[str]) -> dg.RunRequest | None:
    """A reconcile_job run for files held by dead runs and runs whose worker is gone; once
    per such set (its run key digests them), so a tick never asks twice for the same."""
    dead = sorted(f"{f.file_id}@{f.run_id}" for f in dead_claims) + sorted(f"run@{r}" for r in dead_runs)
    if not dead:
        return None
    digest = hashlib.sha256("\n".join(dead).encode()).hexdigest()[:16]
    return dg.RunRequest(
        run_key=f"reconcile:{digest}",
        run_config=CONSOLE_LOGGER,
        job_name=RECONCILE_JOB,
        tags={KIND_TAG: "recovery", DEAD_TAG: str(len(dead))},
    )
