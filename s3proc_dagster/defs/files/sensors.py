"""`watch_directory_sensor`: one run per new, changed and stable file under WATCH_PATH."""

import hashlib
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from s3proc_dagster.defs.files.jobs import reconcile_job
from s3proc_dagster.defs.files.ops import PRODUCT_JOBS, TAG
from s3proc_dagster.defs.resources import PipelineSettings, ProgressStoreResource, S3Storage
from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.runs.liveness import dead_runs, run_is_alive
from s3proc_dagster.runs.tags import file_run_tags
from s3proc_dagster.images.request_csv import looks_like_request_csv
from s3proc_dagster.sources.metadata import read_sidecar, run_tags
from s3proc_dagster.models import FileStatus, ProcessingStatus, make_file_id
from s3proc_dagster.sources.s3_incoming import IncomingCursor, list_incoming, seed_metadata
from s3proc_dagster.sources.watch import WatchCursor, evaluate, scan

RUN_KEY_TAG = "dagster/run_key"


def run_request_for(
    path: str, relative_path: str, run_key: str, file_id: str | None = None, metadata: dict | None = None
) -> dg.RunRequest:
    """A product CSV (by its header, not its name) goes to image_request_job; any other
    file to process_file_job. File metadata becomes tags, `priority` the run's priority."""
    if path.lower().endswith(".csv") and "://" not in path and looks_like_request_csv(Path(path)):
        return dg.RunRequest(
            run_key=run_key,
            job_name="image_request_job",
            run_config={"ops": {"validate_request": {"config": {"path": path}}}},
            tags={f"{TAG}/path": relative_path, f"{TAG}/kind": "image_request", **run_tags(metadata or {})},
        )
    if metadata is None and "://" not in path:
        try:
            metadata = read_sidecar(Path(path))
        except S3ProcError:
            metadata = {}  # the run fails on it with a message naming the sidecar
    file_id = file_id or make_file_id(relative_path)
    return dg.RunRequest(
        job_name="process_file_job",
        run_key=run_key,
        run_config={"ops": {"checksum_calculation": {"config": {"path": path, "relative_path": relative_path}}}},
        tags=file_run_tags(relative_path, path, file_id, metadata),
    )


def _retry_stamp(status: FileStatus) -> str:
    return f"retry-{int(status.last_updated_at.timestamp() * 1000)}"


def requeued(store_files: list[FileStatus], root: Path) -> list[dg.RunRequest]:
    """Files under `root` set back to PENDING after having started (manual retry, crash
    recovery, a run that died before it could claim its file).

    Run keys are permanent in Dagster, so such a file gets a new key carrying the time
    it was reset; new files never match (they have not started yet).
    """
    out = []
    for status in store_files:
        path = Path(status.file_path)
        if status.processing_started_at is None or "://" in status.file_path or not path.is_file():
            continue
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            continue
        st = path.stat()
        key = f"{rel}:{st.st_size}:{st.st_mtime_ns}:{_retry_stamp(status)}"
        out.append(run_request_for(str(path), rel, key, status.file_id))
    return out


def requeued_objects(store_files: list[FileStatus], bucket: str, prefix: str) -> list[dg.RunRequest]:
    """The same for objects under the S3 incoming prefix: S3 lists an object once per
    version, so a version whose run died would otherwise never be requested again."""
    root = prefix.strip("/") + "/" if prefix.strip("/") else ""
    out = []
    for status in store_files:
        if status.processing_started_at is None or status.s3_bucket != bucket or not status.s3_key:
            continue
        if not status.s3_key.startswith(root):
            continue
        rel = status.s3_key[len(root):]
        key = f"s3:{status.s3_key}:{_retry_stamp(status)}"
        out.append(run_request_for(status.file_path, rel, key, status.file_id, metadata=status.metadata))
    return out


def recovery_request(store_files: list[FileStatus], dead_runs: list[str], is_alive) -> dg.RunRequest | None:
    """A reconcile_job run when some IN_PROGRESS file's run is dead, or some run of the
    product died before it claimed its file; once per set of dead claims and runs.

    The sensor only looks (a store query and a liveness check per file and run in flight);
    the destructive part, aborting uploads and deleting objects, runs as a visible,
    retryable run of its own.
    """
    dead = sorted(f"{f.file_id}@{f.run_id}" for f in store_files if not (f.run_id and is_alive(f.run_id)))
    dead += sorted(f"run@{run_id}" for run_id in dead_runs)
    if not dead:
        return None
    digest = hashlib.sha256("\n".join(dead).encode()).hexdigest()[:16]
    return dg.RunRequest(
        run_key=f"reconcile:{digest}",
        job_name="reconcile_job",
        tags={f"{TAG}/kind": "recovery", f"{TAG}/dead_claims": str(len(dead))},
    )


def build_watch_sensor(jobs: list[dg.JobDefinition], poll_interval_ms: int) -> dg.SensorDefinition:
    # Dagster ticks at most once a second; shorter POLL_INTERVAL_MS values round up.
    interval = max(1, math.ceil(poll_interval_ms / 1000))

    @dg.sensor(
        name="watch_directory_sensor",
        jobs=[*jobs, *([] if reconcile_job in jobs else [reconcile_job])],  # it asks for recovery runs too
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="One run of process_file_job per new or changed file under WATCH_PATH, once stable.",
    )
    def watch_directory_sensor(
        context: dg.SensorEvaluationContext,
        settings: PipelineSettings,
        progress_store: ProgressStoreResource,
    ) -> dg.SensorResult:
        root = Path(settings.watch_path)
        store = progress_store.open()
        files = scan(root, skip_dirs=(Path(settings.error_directory), Path(settings.staging_directory)))
        ready, cursor = evaluate(
            files,
            WatchCursor.loads(context.cursor),
            now_ms=int(time.time() * 1000),
            stability_threshold_ms=settings.stability_threshold_ms,
            ignore_initial=settings.ignore_initial,
        )
        retries = requeued(store.list_files(ProcessingStatus.PENDING), root)
        retried_paths = {r.tags[f"{TAG}/path"] for r in retries}
        requests = [
            run_request_for(str(f.path), f.relative_path, f.run_key) for f in ready if f.relative_path not in retried_paths
        ]
        requests += retries
        alive = run_is_alive(context.instance)
        recover = recovery_request(
            store.list_files(ProcessingStatus.IN_PROGRESS), dead_runs(context.instance, PRODUCT_JOBS), alive
        )
        if recover is not None:
            requests.append(recover)
        if cursor.waiting:
            context.log.info(f"{len(cursor.waiting)} file(s) still being written")
        return dg.SensorResult(run_requests=requests, cursor=cursor.dumps())

    return watch_directory_sensor



def build_s3_incoming_sensor(job: dg.JobDefinition, enabled: bool, poll_interval_ms: int) -> dg.SensorDefinition:
    """`s3_incoming_sensor`: one run per new or changed object under S3_INCOMING_PREFIX."""

    @dg.sensor(
        name="s3_incoming_sensor",
        job=job,
        minimum_interval_seconds=max(1, math.ceil(poll_interval_ms / 1000)),
        default_status=dg.DefaultSensorStatus.RUNNING if enabled else dg.DefaultSensorStatus.STOPPED,
        description="One run of process_file_job per new or changed object under S3_INCOMING_PREFIX.",
    )
    def s3_incoming_sensor(
        context: dg.SensorEvaluationContext,
        settings: PipelineSettings,
        s3: S3Storage,
        progress_store: ProgressStoreResource,
    ) -> dg.SensorResult | dg.SkipReason:
        if not s3.incoming_prefix:
            return dg.SkipReason("S3_INCOMING_PREFIX is not set")
        client = s3.get_client()
        found, cursor = list_incoming(
            client,
            s3.incoming_bucket or s3.bucket,
            s3.incoming_prefix,
            IncomingCursor.loads(context.cursor),
            now=datetime.now(UTC),
            ignore_initial=settings.ignore_initial,
            exclude_prefixes=(s3.key("") + "/",) if (s3.incoming_bucket or s3.bucket) == s3.bucket else (),
            page_size=settings.s3_list_page_size,
            max_pages=settings.s3_list_pages_per_tick,
        )
        requests = []
        for obj in found:
            if context.instance.get_run_records(dg.RunsFilter(tags={RUN_KEY_TAG: obj.run_key}), limit=1):
                continue  # listed again at a pass boundary, already run
            head = client.head_object(Bucket=obj.bucket, Key=obj.key)
            requests.append(
                run_request_for(obj.uri, obj.relative_path, obj.run_key, metadata=seed_metadata(head.get("Metadata", {})))
            )
        pending = progress_store.open().list_files(ProcessingStatus.PENDING)
        fresh = {r.tags[f"{TAG}/source"] for r in requests}
        requests += [
            r
            for r in requeued_objects(pending, s3.incoming_bucket or s3.bucket, s3.incoming_prefix)
            if r.tags[f"{TAG}/source"] not in fresh
        ]
        return dg.SensorResult(run_requests=requests, cursor=cursor.dumps())

    return s3_incoming_sensor
