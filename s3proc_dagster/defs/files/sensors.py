"""The sensors that start files' runs: one on WATCH_PATH, one on S3_INCOMING_PREFIX.

Both are glue around pure domain logic (`sources.watch.evaluate`, `sources.s3_incoming.
list_incoming`) and `runs.requests`. Each tick also looks for work a crash left (files
held by dead runs, runs whose worker is gone) and asks for one `reconcile_job` run: the
sensor only looks; recovery runs as a run of its own, visible and retryable in the UI.
"""

import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from s3proc_dagster.defs.files.jobs import PRODUCT_JOBS, process_file_job, process_files_job, reconcile_job
from s3proc_dagster.defs.images.jobs import image_request_job
from s3proc_dagster.defs.loggers import tick_log
from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.errors import ObjectUnreadable
from s3proc_dagster.files.globs import admitted
from s3proc_dagster.models import ProcessingStatus
from s3proc_dagster.names import FILE_ID_TAG, JOB_TAG, PATH_TAG, SOURCE_TAG
from s3proc_dagster.runs.batching import BatchLimits, arrival_tag, source_of, under_backlog
from s3proc_dagster.runs.liveness import dead_runs, run_is_alive
from s3proc_dagster.runs.requests import recovery_request, requeued, requeued_objects, run_request_for
from s3proc_dagster.settings import Configuration, poll_interval_s
from s3proc_dagster.sources.names import printable, utf8_name
from s3proc_dagster.sources.s3_incoming import IncomingCursor, list_incoming, metadata_from_object, start_cursor
from s3proc_dagster.sources.watch import SeenFile, WatchCursor, evaluate, scan, wait_for_ready
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer import verify
from s3proc_dagster.transfer.keys import prefix_folder, split_uri
from s3proc_dagster.zones.declared import (
    DeclaredZone,
    declared,
    declared_directories,
    zone_holding,
    zone_of_path,
)

RUN_KEY_TAG = "dagster/run_key"
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
# how long a tick may look, from its start: the daemon's loop is 5 s, and what Dagster does
# around a tick (its gRPC call, the resources, writing the tick) takes up to a second or so
# more under load; a tick still running when the loop comes round waits a whole loop more
TICK_WAIT_S = 3.5
# how long an incoming tick may spend on objects (listing, run-key lookups, a HEAD for each
# new one); Dagster gives a tick 60 s before it fails it and keeps the old cursor
INCOMING_TICK_S = 20.0
LOOKUP_CHUNK = 500  # run keys looked up in one query
# ticks waiting at once in one code server: each holds one of its gRPC threads (6 on 2 cores),
# which the webserver and the daemon's other calls need too; a tick that finds none taken looks once
_WAITING = threading.BoundedSemaphore(2)


def _recovery(context: dg.SensorEvaluationContext, store: ProgressStore) -> list[dg.RunRequest]:
    alive = run_is_alive(context.instance)
    held_by_dead = [f for f in store.list_files(ProcessingStatus.IN_PROGRESS) if not (f.run_id and alive(f.run_id))]
    request = recovery_request(held_by_dead, dead_runs(context.instance, PRODUCT_JOBS))
    return [request] if request else []


def watch_tick(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    store: ProgressStore,
    zone: Mapping[str, str] | None = None,
    skip: tuple[Path, ...] = (),
) -> tuple[list[dg.RunRequest], str]:
    """One tick of a watched directory: WATCH_PATH of `settings` (a zone's, or the
    deployment's); the run requests and the next cursor."""
    started = time.monotonic()
    cfg = settings.config
    root = cfg.monitoring.watch_path
    skip_dirs = (cfg.processing.error_directory, cfg.processing.staging_directory, *skip)
    cursor = WatchCursor.loads(context.cursor)

    unnamed: set[str] = set()  # no run can carry such a name (tags, config, records are UTF-8)

    def look() -> list[SeenFile]:
        nonlocal cursor
        files = [f for f in scan(root, skip_dirs=skip_dirs) if zone_admits(cfg, f.relative_path)]
        unnamed.update(f.relative_path for f in files if not utf8_name(f.relative_path))
        files = [f for f in files if utf8_name(f.relative_path)]
        ready, cursor = evaluate(
            files,
            cursor,
            now_ms=int(time.time() * 1000),
            stability_threshold_ms=cfg.monitoring.stability_threshold_ms,
            ignore_initial=cfg.monitoring.ignore_initial,
        )
        return ready

    ready = look()
    requests = requeued(store.list_files(ProcessingStatus.PENDING), root, zone)
    if zone is None:  # the default zone's: a declared zone's files are its own sensor's
        requests = [r for r in requests if zone_of_path(source_of(r)["path"]) is None]
    if not ready and not requests and _may_wait(context) and _WAITING.acquire(blocking=False):
        try:  # nothing to do yet: look again every POLL_INTERVAL_MS for most of the daemon's loop
            budget = TICK_WAIT_S - (time.monotonic() - started)
            ready = wait_for_ready(look, budget, max(cfg.monitoring.poll_interval_ms, 50) / 1000)
        finally:
            _WAITING.release()
    if unnamed:  # said once a tick, and left where they are
        shown = ", ".join(sorted(printable(os.fsencode(n).decode("utf-8", "backslashreplace")) for n in unnamed))
        tick_log(context, cfg.logging).warning(
            f"{len(unnamed)} file(s) whose name is not valid UTF-8 are left alone; rename: {shown}"
        )
    again = {r.tags[PATH_TAG] for r in requests}
    requests = _not_in_flight(context, requests)
    requests += [
        run_request_for(str(f.path), f.relative_path, f.run_key, roots=(root,), zone=zone)
        for f in ready
        if f.relative_path not in again
    ]
    if cursor.waiting:
        tick_log(context, cfg.logging).info(f"{len(cursor.waiting)} file(s) still being written")
    sizes = {str(f.path): f.size for f in ready}
    requests = _batched(context, settings, requests, lambda r: sizes.get(source_of(r)["path"]) or _size(r))
    return requests, cursor.dumps()


def _not_in_flight(context: dg.SensorEvaluationContext, requeued: list[dg.RunRequest]) -> list[dg.RunRequest]:
    """The requeued files no run is already queued or running for: `s3proc backfill` sets a
    FAILED file back to PENDING and queues its run itself, which the requeue would double."""
    if not requeued:
        return requeued
    ids = [r.tags[FILE_ID_TAG] for r in requeued]
    records = context.instance.get_run_records(dg.RunsFilter(tags={FILE_ID_TAG: ids}, statuses=IN_FLIGHT))
    busy = {record.dagster_run.tags.get(FILE_ID_TAG) for record in records}
    return [r for r in requeued if r.tags[FILE_ID_TAG] not in busy]


def _may_wait(context: dg.SensorEvaluationContext) -> bool:
    """A tick waits for arrivals only when the daemon evaluates sensors in threads (the
    project's instance, `runs/instance.py`): a daemon evaluating them one by one would hold every
    other sensor back for it. A tick built in-process (`build_sensor_context`, no instance
    ref) looks once."""
    return context.instance_ref is not None and bool(context.instance.get_settings("sensors").get("use_threads"))


def zone_admits(cfg: Configuration, relative_path: str) -> bool:
    return admitted(relative_path, cfg.zone.include, cfg.zone.exclude)


@dg.sensor(
    name="watch_directory_sensor",
    jobs=[process_file_job, process_files_job, image_request_job, reconcile_job],
    minimum_interval_seconds=poll_interval_s(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A run per new or changed file under WATCH_PATH once stable (small files share runs under a backlog).",
)
def watch_directory_sensor(
    context: dg.SensorEvaluationContext, settings: Settings, progress_store: ProgressStoreResource
) -> dg.SensorResult:
    store = progress_store.open()
    if zone_holding(settings.config.monitoring.watch_path) is None:
        requests, cursor = watch_tick(context, settings, store, skip=declared_directories())
    else:  # a zone's source is WATCH_PATH or holds it: its files are that zone's sensor's
        requests, cursor = [], context.cursor
    return dg.SensorResult(run_requests=requests + _recovery(context, store), cursor=cursor)


def _size(request: dg.RunRequest) -> int | None:
    try:
        return os.stat(source_of(request)["path"]).st_size
    except (OSError, KeyError):
        return None


def _batched(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    requests: list[dg.RunRequest],
    size_of: Callable[[dg.RunRequest], int | None],
) -> list[dg.RunRequest]:
    """Small files share runs while the queue is behind (`runs.batching`); BATCH_FILES=false: never."""
    processing = settings.config.processing
    if not processing.batch_files or len(requests) < 2:
        return requests
    queued = context.instance.get_runs_count(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED], tags={JOB_TAG: "files"})
    )
    limits = BatchLimits(processing.batch_max_files, processing.batch_max_bytes, processing.batch_file_max_bytes)
    return under_backlog(requests, size_of, processing.max_concurrency, queued, limits)


def incoming_tick(
    context: dg.SensorEvaluationContext,
    settings: Settings,
    client: Any,
    store: ProgressStore,
    zone: Mapping[str, str] | None = None,
) -> tuple[list[dg.RunRequest], str]:
    """One tick of an incoming prefix: S3_INCOMING_PREFIX (and bucket) of `settings`; the
    run requests and the next cursor. Within INCOMING_TICK_S: the objects it had no time
    for are the next tick's, which resumes after the last one it requested."""
    started = time.monotonic()
    cfg = settings.config.s3
    bucket = cfg.incoming_bucket_name
    now = datetime.now(UTC)
    begun = start_cursor(IncomingCursor.loads(context.cursor), now, settings.config.monitoring.ignore_initial)
    found, cursor = list_incoming(
        client,
        bucket,
        cfg.incoming_prefix,
        begun,
        now=now,
        # the product's own objects never come back in as input
        exclude_prefixes=_not_incoming(settings.config, bucket, zone is None),
        deadline=started + INCOMING_TICK_S / 2,
    )
    found = [obj for obj in found if zone_admits(settings.config, obj.relative_path)]
    requests: list[dg.RunRequest] = []
    stopped = 0  # the first object this tick had no time for, when one was left
    for start in range(0, len(found), LOOKUP_CHUNK):
        chunk = found[start : start + LOOKUP_CHUNK]
        requested = already_requested(context.instance, [obj.run_key for obj in chunk])
        for index, obj in enumerate(chunk, start=start):
            if index and time.monotonic() - started > INCOMING_TICK_S:
                stopped = index
                break
            if obj.run_key in requested:
                continue  # listed again at a pass boundary, already run
            try:
                head = verify.head(client, obj.bucket, obj.key)
            except ObjectUnreadable as exc:  # this object alone (SSE-C, a per-object policy): its run says why
                tick_log(context, settings.config.logging).warning(f"{exc}; its run records the reason")
                head = {}
            if head is None:
                continue  # deleted since it was listed
            metadata = metadata_from_object(head.get("Metadata", {}))
            requests.append(run_request_for(obj.uri, obj.relative_path, obj.run_key, metadata=metadata, zone=zone))
        if stopped:
            break
    if stopped:  # the rest is the next tick's, which resumes after the last one looked at
        cursor = begun.resumed_after(found[stopped - 1].key)
        tick_log(context, settings.config.logging).info(
            f"{len(found) - stopped} object(s) left for the next tick (a tick spends at most {INCOMING_TICK_S:.0f} s)"
        )
    fresh = {r.tags[SOURCE_TAG] for r in requests}
    pending = store.list_files(ProcessingStatus.PENDING)
    requeue = requeued_objects(pending, bucket, cfg.incoming_prefix, zone)
    if zone is None:
        requeue = [r for r in requeue if zone_of_path(r.tags[SOURCE_TAG]) is None]
    requests += _not_in_flight(context, [r for r in requeue if r.tags[SOURCE_TAG] not in fresh])
    sizes = {obj.uri: obj.size for obj in found}
    return _batched(context, settings, requests, lambda r: sizes.get(source_of(r)["path"])), cursor.dumps()


def already_requested(instance: dg.DagsterInstance, run_keys: list[str]) -> set[str]:
    """Which of these objects' run keys a run already has, in two queries whatever their
    number: a run of its own carries its key as `dagster/run_key`, a batch one arrival tag
    per object (`runs.batching.batch_request`). One query per object cost a flood of 5,000
    objects 40 s a tick on a loaded machine."""
    if not run_keys:
        return set()
    own = instance.get_run_records(dg.RunsFilter(tags={RUN_KEY_TAG: run_keys}))
    found = {record.dagster_run.tags.get(RUN_KEY_TAG) for record in own}
    by_tag = {arrival_tag(key): key for key in run_keys}
    found |= {by_tag[tag] for tag, _ in instance.get_run_tags(tag_keys=list(by_tag)) if tag in by_tag}
    return found


def _not_incoming(cfg: Configuration, bucket: str, default_zone: bool) -> tuple[str, ...]:
    """Prefixes an incoming listing skips: the product's own objects never come back in as
    input, and the default zone leaves declared zones' prefixes to their sensors."""
    own = (prefix_folder(cfg.s3.prefix), prefix_folder(cfg.s3.step_outputs_prefix)) if bucket == cfg.s3.bucket else ()
    zones = tuple(
        prefix_folder(split_uri(z.source)[1])
        for z in declared()
        if default_zone and z.directory is None and split_uri(z.source)[0] == bucket
    )
    return own + zones


@dg.sensor(
    name="s3_incoming_sensor",
    jobs=[process_file_job, process_files_job],
    minimum_interval_seconds=poll_interval_s(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A run per new or changed object under S3_INCOMING_PREFIX, when set (small ones share runs under a backlog).",
)
def s3_incoming_sensor(
    context: dg.SensorEvaluationContext, settings: Settings, s3: S3Storage, progress_store: ProgressStoreResource
) -> dg.SensorResult | dg.SkipReason:
    if not settings.config.s3.incoming_prefix:
        return dg.SkipReason("S3_INCOMING_PREFIX is not set")
    requests, cursor = incoming_tick(context, settings, s3.get_client(), progress_store.open())
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def zone_sensor(zone: DeclaredZone) -> dg.SensorDefinition:
    """A declared landing zone's sensor: the default zone's ticks on the zone's settings,
    its requests carrying them (`runs.requests.run_request_for`)."""
    settings_of_zone = dict(zone.settings)

    @dg.sensor(
        name=f"{zone.name}_zone_sensor",
        jobs=[process_file_job, process_files_job],
        minimum_interval_seconds=poll_interval_s(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"A run per new or changed file of landing zone {zone.name} ({zone.source}).",
    )
    def sensor(
        context: dg.SensorEvaluationContext, settings: Settings, progress_store: ProgressStoreResource, s3: S3Storage
    ) -> dg.SensorResult:
        mine, store = settings.for_zone(settings_of_zone), progress_store.open()
        if zone.directory is None:
            requests, cursor = incoming_tick(context, mine, s3.get_client(), store, settings_of_zone)
        else:  # the deployment's error directory may be inside its source: parked files stay parked
            skip = (settings.config.processing.error_directory,)
            requests, cursor = watch_tick(context, mine, store, settings_of_zone, skip=skip)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return sensor


def zone_sensors() -> list[dg.SensorDefinition]:
    """The sensors of every declared, enabled zone, once the components have loaded."""
    return [zone_sensor(zone) for zone in declared() if zone.enabled]
