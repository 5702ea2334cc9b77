"""When small files share a run: under a backlog, and only then.

A run has a fixed cost (queue, launch, events) that a file of a few KB does not repay, so
when more files are ready than the run queue can start (`MAX_CONCURRENCY`), small files
are grouped into runs of `process_files_job`: the same seven steps, each over all the
batch's files, so each file keeps its own records, asset materializations and failure,
and a file that keeps failing leaves the batch for a run of its own
(`defs/files/steps.py`), where "Re-execute from failure" applies to it. Without a backlog every file gets a run of its own: the
lowest latency, and a run per file is what a user looks for in the UI.

A file always gets its own run when it is big (its conversion and upload are the cost,
not the run), when it carries metadata (a sidecar: its tags and `dagster/priority` belong
to its run), or when it is not a file for `process_file_job` (a product CSV).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from s3proc_dagster.models import make_file_id
from s3proc_dagster.names import (
    ARRIVAL_TAG,
    BATCH_TAG,
    CHECKSUM_OP,
    DEFAULT_PRIORITY_TAG,
    EXTENSION_TAG,
    FILE_ID_TAG,
    FILE_TAG,
    PARTITION_TAG,
    PATH_TAG,
    PROCESS_FILE_JOB,
    PROCESS_FILES_JOB,
    SOURCE_TAG,
    ZONE_TAG,
    ZONES_KEY,
)
from s3proc_dagster.runs.requests import CONSOLE_LOGGER
from s3proc_dagster.zones.declared import DeclaredZone, zone_named

#: The tags any file's run carries (`tags.file_run_tags`); any other `s3proc/` tag is metadata.
# (a zone's name and priority too: the same for every file of its sensor's requests; a
# file's own `priority` comes with its metadata tags, which keep it out of batches)
_PLAIN_TAGS = {PATH_TAG, SOURCE_TAG, FILE_ID_TAG, EXTENSION_TAG, ZONE_TAG, DEFAULT_PRIORITY_TAG}


@dataclass(frozen=True)
class BatchLimits:
    max_files: int
    max_bytes: int
    file_max_bytes: int


def group(sizes: Sequence[int], slots: int, limits: BatchLimits) -> list[list[int]]:
    """Indexes of `sizes` in runs, in arrival order, each within the count and byte limits.

    The number of runs is a multiple of `slots`, so the runs come in full waves: 300 files
    on 4 slots at 50 a run are 8 runs of 38, two waves, not 6 runs of 50 whose last two
    run while two slots idle."""
    slots = max(1, slots)
    waves = max(1, math.ceil(math.ceil(len(sizes) / limits.max_files) / slots))
    per_run = max(1, math.ceil(len(sizes) / (waves * slots)))
    runs: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and (len(current) >= per_run or total + size > limits.max_bytes):
            runs.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        runs.append(current)
    return runs


def source_of(request: dg.RunRequest) -> dict[str, str]:
    """The `SourceConfig` of a process_file_job request: its file."""
    config = request.run_config["ops"][CHECKSUM_OP]["config"]
    return {"path": config["path"], "relative_path": config.get("relative_path", "")}


def _batch_config(requests: Sequence[dg.RunRequest]) -> dict:
    """The files, and their zone's settings: a sensor batches only its own zone's files."""
    config: dict = {"files": [source_of(r) for r in requests]}
    zone = requests[0].run_config["ops"][CHECKSUM_OP]["config"].get("zone")
    if zone:
        config["zone"] = zone
    return config


def batchable(request: dg.RunRequest, size: int | None, limits: BatchLimits) -> bool:
    return (
        request.job_name == PROCESS_FILE_JOB
        and size is not None
        and size <= limits.file_max_bytes
        and not {t for t in request.tags if t not in _PLAIN_TAGS and not t.startswith(FILE_TAG + "/")}
    )


def is_object_key(run_key: str | None) -> bool:
    """An incoming object's run key (`sources.s3_incoming.IncomingObject.run_key`)."""
    return bool(run_key) and str(run_key).startswith("s3:")


def arrival_tag(run_key: str) -> str:
    """The tag by which a batch run is found for one object's arrival (its run key): the
    batch's own run key is the digest of them all, and an object listed again at the
    incoming sensor's next pass would otherwise get a second run."""
    return f"{ARRIVAL_TAG}/{hashlib.sha256(run_key.encode()).hexdigest()[:24]}"


def batch_request(requests: Sequence[dg.RunRequest]) -> dg.RunRequest:
    """One process_files_job run for these files' requests (one per file version, as theirs)."""
    keys = "\n".join(str(r.run_key) for r in requests)
    return dg.RunRequest(
        run_key=f"batch:{hashlib.sha256(keys.encode()).hexdigest()[:24]}",
        job_name=PROCESS_FILES_JOB,
        run_config={"ops": {CHECKSUM_OP: {"config": _batch_config(requests)}}, **CONSOLE_LOGGER},
        tags={
            **{k: v for k, v in requests[0].tags.items() if k in (ZONE_TAG, DEFAULT_PRIORITY_TAG)},
            BATCH_TAG: str(len(requests)),
            **{k: v for r in requests for k, v in r.tags.items() if k.startswith(FILE_TAG + "/")},
            **{arrival_tag(r.run_key): r.tags[PATH_TAG] for r in requests if is_object_key(r.run_key)},
        },
    )


def under_backlog(
    requests: list[dg.RunRequest],
    size_of: Callable[[dg.RunRequest], int | None],
    slots: int,
    waiting: int,
    limits: BatchLimits,
) -> list[dg.RunRequest]:
    """`requests` as they are when the queue can start them promptly (`waiting` runs already
    queued plus these fit in `slots`); otherwise small files grouped into batch runs."""
    small: list[dg.RunRequest] = []
    own: list[dg.RunRequest] = []
    for request in requests:  # only a file's run has a size to ask for (an image request's has none)
        size = size_of(request) if request.job_name == PROCESS_FILE_JOB else None
        (small if batchable(request, size, limits) else own).append(request)
    if len(small) < 2 or waiting + len(requests) <= slots:
        return requests
    batches = group([size_of(r) or 0 for r in small], slots, limits)
    return own + [small[i[0]] if len(i) == 1 else batch_request([small[j] for j in i]) for i in batches]


@dataclass(frozen=True)
class RunFile:
    """A file a run was started for, as the run's config names it: what the failure hook
    and crash recovery act on. Never read from the run's tags, which metadata shares."""

    path: str
    relative_path: str
    file_id: str


def run_file(source: dict, watch_path: Path, incoming_prefix: str, zone: str = "") -> RunFile:
    """The file one entry of a run's config names, located by the first step's own rule."""
    from s3proc_dagster.errors import UnsafeSourceError
    from s3proc_dagster.sources.resolve import locate

    path, relative = source["path"], source.get("relative_path") or ""
    try:
        located = locate(path, watch_path, incoming_prefix, relative, zone)
    except UnsafeSourceError:  # its run failed on the name: the record keeps the name as given
        return RunFile(path, relative or path, make_file_id(relative or path, zone))
    return RunFile(located.uri, located.relative_path, located.file_id)


def zone_of_run(run: dg.DagsterRun) -> dict[str, str]:
    """The settings of the landing zone a run's files belong to ({} for the default zone):
    as its sensor put them in the run's config, or the zone whose asset the run materializes."""
    config = (run.run_config or {}).get("ops", {}).get(CHECKSUM_OP, {}).get("config") or {}
    if config.get("zone"):
        return dict(config["zone"])
    materialized = zone_materialized(run)
    return dict(materialized[0].settings) if materialized else {}


def zone_materialized(run: dg.DagsterRun) -> tuple[DeclaredZone, dict] | None:
    """(the zone, its file as a run config names one) of a run that materializes a file's
    partition of a zone's asset (the catalog's Materialize), whose config names no file."""
    partition = run.tags.get(PARTITION_TAG)
    for key in run.asset_selection or ():
        if partition and len(key.path) == 2 and key.path[0] == ZONES_KEY:
            zone = zone_named(key.path[1])
            if zone is not None:
                return zone, {"path": zone.source_of(partition), "relative_path": partition}
    return None


def files_of_run(run: dg.DagsterRun, watch_path: Path, incoming_prefix: str = "") -> list[RunFile]:
    """The files a run of either file job (or of a zone's asset) was started for, in the
    batch's order, located by the same rule as the run's first step
    (`sources.resolve.locate`), in the run's zone."""
    config = (run.run_config or {}).get("ops", {}).get(CHECKSUM_OP, {}).get("config")
    materialized = None if config else zone_materialized(run)
    if materialized:
        sources = [materialized[1]]
    elif config:
        sources = config.get("files", []) if run.job_name == PROCESS_FILES_JOB else [config]
    else:
        return []
    zone = zone_of_run(run)  # a declared zone's runs: its source, its names
    watch = Path(zone.get("WATCH_PATH") or watch_path)
    incoming = zone.get("S3_INCOMING_PREFIX", incoming_prefix)
    return [run_file(source, watch, incoming, zone.get("ZONE_NAME", "")) for source in sources]
