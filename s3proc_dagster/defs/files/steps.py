"""What a step's failure costs a file, decided in one place for every op of both file jobs.

- Bad input (`errors.is_transient` says no retry can cure it): the file is FAILED with the
  step and the reason, its uploads given up and the original parked (`pipeline.give_up`),
  and the UI gets a FAILED observation on its asset. A run of its own then fails, as the
  user expects to see; a batch goes on with its other files.
- A transient error retries the step with backoff (MAX_RETRIES, RETRY_DELAY_MS): Dagster's
  RetryRequested, the schedule read from the settings when the step fails. A retried step
  goes over its files again; each step finds what it finished already (records, staged
  work, objects in S3) and does not do it twice, and a file already COMPLETED is not taken
  up again at all, in a retried step or in a re-execution (`_settled_before`).
- Still failing once the retries are spent: a run of one file gives the file up and fails,
  so "Re-execute from failure" in the UI applies to it; a file of a batch leaves the
  batch: PENDING again, and the sensor gives it a run of its own, where the same applies.

There is no failure hook: a hook writes a HOOK_SKIPPED row for every step that did not
fail, 10-18 ms each on SQLite; what the ops do not catch (a killed worker) is crash
recovery's (`reconcile_job`).
"""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
from dagster._core.events import DagsterEvent
from pydantic import Field

from s3proc_dagster import pipeline
from s3proc_dagster.defs.files import events
from s3proc_dagster.defs.resources import ProgressStoreResource, S3Storage, Settings
from s3proc_dagster.logs import about, get_logger
from s3proc_dagster.models import ProcessingStatus
from s3proc_dagster.names import HAS_FAILURES_TAG, PROCESS_FILES_JOB
from s3proc_dagster.pipeline import Claimant, StepContext
from s3proc_dagster.pipeline.batch import Attempt, FileInRun, Outcome, each_file, leave_run, reason_of
from s3proc_dagster.runs.batching import run_file, zone_of_run
from s3proc_dagster.runs.liveness import run_is_alive
from s3proc_dagster.zones.drift import SchemaDrift

log = get_logger("steps")


class SourceConfig(dg.Config):
    """One file: where it is and its path below WATCH_PATH or S3_INCOMING_PREFIX."""

    path: str = Field(description="absolute path of the file, or s3://bucket/key")
    relative_path: str = Field(
        default="", description="path below WATCH_PATH or S3_INCOMING_PREFIX (derived when empty)"
    )


class FilesConfig(dg.Config):
    """Which files the run processes: one (`path`, process_file_job) or several (`files`,
    process_files_job). The sensors fill it in; so can the Launchpad."""

    path: str = Field(default="", description="one file: its absolute path, or s3://bucket/key")
    relative_path: str = Field(
        default="", description="one file: its path below WATCH_PATH or S3_INCOMING_PREFIX (derived when empty)"
    )
    files: list[SourceConfig] = Field(default_factory=list, description="several files, in order (a batch)")
    zone: dict[str, str] = Field(
        default_factory=dict,
        description="the landing zone's settings by variable name (its sensor sets them); empty: the default zone",
    )

    def sources(self, materialized: dict | None = None) -> list[SourceConfig]:
        """The run's files; `materialized`, the file of a zone asset's partition
        (`batching.zone_materialized`), when the config names none."""
        if materialized and not self.path and not self.files:
            return [SourceConfig(**materialized)]
        if bool(self.path) == bool(self.files):
            raise dg.Failure(
                description="the run's config names no file, or both `path` and `files`", allow_retries=False
            )
        return list(self.files) or [SourceConfig(path=self.path, relative_path=self.relative_path)]


def run_settings(context: dg.OpExecutionContext, settings: Settings) -> Settings:
    """The settings of the run's landing zone: the zone's own variables over the deployment's."""
    return settings.for_zone(zone_of_run(context.dagster_run))


def in_batch(context: dg.OpExecutionContext) -> bool:
    return context.job_name == PROCESS_FILES_JOB


def tag_run(context: dg.OpExecutionContext, tags: dict[str, str]) -> None:
    """Tags are for finding runs in the UI, not part of the file's processing: a busy run
    storage (SQLite's `database is locked` under a backlog) costs a warning, not the file."""
    try:
        context.instance.add_run_tags(context.run_id, tags)
    except Exception as exc:
        context.log.warning(f"run tags not written ({type(exc).__name__}: {exc}); the file goes on")


def step_context(
    context: dg.OpExecutionContext, settings: Settings, progress_store: ProgressStoreResource, s3: S3Storage
) -> StepContext:
    """What a step is given, from the op's resources: this run as the claimant."""
    return StepContext(
        store=progress_store.open(),
        claimant=Claimant(context.run_id, run_is_alive(context.instance)),
        staging=settings.staging,
        client=s3.get_client(),
        bucket=s3.bucket,
        prefix=settings.config.s3.prefix,
        error_dir=settings.config.processing.error_directory,
    )


def run_step(
    context: dg.OpExecutionContext,
    settings: Settings,
    progress_store: ProgressStoreResource,
    s3: S3Storage,
    files: list[FileInRun],
    step: Callable[[StepContext, FileInRun], FileInRun],
) -> list[FileInRun]:
    """`step` on each file still in the run, and what each failure costs its file (module docstring)."""
    ctx = step_context(context, settings, progress_store, s3)
    if context.retry_number or context.dagster_run.parent_run_id:  # a retried or re-executed step
        files = _settled_before(context, settings, ctx, files)
    attempt = each_file(files, lambda file: step(ctx, file))
    done = attempt.files
    for index, exc in attempt.failed:
        done[index] = _give_up(context, settings, ctx, done[index], exc)
    if attempt.retry:
        done = _after_transient(context, settings, ctx, attempt, done)
    if attempt.failed and not in_batch(context):
        raise dg.Failure(description=reason_of(attempt.failed[0][1]), allow_retries=False)
    return done


def _after_transient(
    context: dg.OpExecutionContext, settings: Settings, ctx: StepContext, attempt: Attempt, done: list[FileInRun]
) -> list[FileInRun]:
    processing = settings.config.processing
    first = attempt.retry[0][1]
    if context.retry_number < processing.max_retries:
        policy = dg.RetryPolicy(
            max_retries=processing.max_retries,
            delay=processing.retry_delay_ms / 1000,
            backoff=dg.Backoff.EXPONENTIAL,
            jitter=dg.Jitter.PLUS_MINUS,
        )
        wait = max(0.0, policy.calculate_delay(context.retry_number + 1))
        names = ", ".join(attempt.files[i].name for i, _ in attempt.retry)
        log.warning(f"{context.op.name}: {names}: {reason_of(first)}; the step is retried in {wait:.1f}s")
        raise dg.RetryRequested(max_retries=processing.max_retries, seconds_to_wait=wait) from first
    if not in_batch(context):
        (index, exc), *_ = attempt.retry
        _give_up(context, settings, ctx, done[index], exc)
        raise first
    for index, exc in attempt.retry:
        done[index] = _leave(context, settings, ctx, done[index], exc)
    return done


def _identity(settings: Settings, file: FileInRun) -> tuple[str, str]:
    """(fileId, where it is) of a file, whatever step it reached: from its version once
    claimed, else located from the run's config by the first step's own rule."""
    if file.version is not None:
        return file.version.file_id, file.version.source.uri
    cfg = settings.config
    located = run_file(
        {"path": file.path, "relative_path": file.relative_path},
        cfg.monitoring.watch_path,
        cfg.s3.incoming_prefix,
        cfg.zone.name,
    )
    return located.file_id, located.path


def _give_up(
    context: dg.OpExecutionContext, settings: Settings, ctx: StepContext, file: FileInRun, exc: BaseException
) -> FileInRun:
    file_id, source = _identity(settings, file)
    reason = f"{context.op.name}: {reason_of(exc)}"
    cfg = settings.config
    gave_up = pipeline.give_up(
        ctx.store,
        ctx.client,
        context.run_id,
        file_id,
        source,
        reason,
        cfg.monitoring.watch_path,
        cfg.processing.error_directory,
    )
    log.error(events.gave_up_message(file.name, context.op.name, reason_of(exc), gave_up), extra=about(file_id))
    catalog = events.Catalog.of(cfg)
    if catalog.zone:
        context.instance.add_dynamic_partitions(events.zone_partitions(catalog.zone), [file.name])
    log_now(context, events.file_failed(catalog, file, reason, gave_up))
    if in_batch(context):  # the batch run succeeds for the rest: this tag finds it among the runs
        tag_run(context, {HAS_FAILURES_TAG: "true"})
    if isinstance(exc, SchemaDrift) and catalog.zone:  # blocked: its schema_drift check says why too
        key, partition = catalog.place(file.name)
        log_now(context, events.drift_blocked(key, partition or file.name, str(exc)))
    return file.out(Outcome.FAILED, reason)


def log_now(context: dg.OpExecutionContext, event: dg.AssetObservation | dg.AssetCheckEvaluation) -> None:
    """A failed file's asset event, kept whatever the step does next: what `log_event` holds
    is written only when the step succeeds, and a step fails right after giving up the file
    of a single-file run, which would take the file's failure out of the catalog. A batch's
    step goes on with the other files, so there `log_event` serves."""
    if in_batch(context):
        context.log_event(event)
        return
    step = context.get_step_execution_context()
    if isinstance(event, dg.AssetCheckEvaluation):
        DagsterEvent.asset_check_evaluation(step, event)
    else:
        DagsterEvent.asset_observation(step, event)


def _leave(
    context: dg.OpExecutionContext, settings: Settings, ctx: StepContext, file: FileInRun, exc: BaseException
) -> FileInRun:
    file_id, source = _identity(settings, file)
    reason = (
        f"{context.op.name}: {reason_of(exc)}; left batch run {context.run_id[:8]} after "
        f"{context.retry_number + 1} attempts, for a run of its own"
    )
    leave_run(ctx.store, context.run_id, file_id, source, reason)
    log.warning(f"{file.name}: {reason}", extra=about(file_id))
    return file.out(Outcome.LEFT, reason)


def _settled_before(
    context: dg.OpExecutionContext, settings: Settings, ctx: StepContext, files: list[FileInRun]
) -> list[FileInRun]:
    """The files a retried or re-executed step must not go over again, out of it: the ones
    its records say are finished.

    The step's input is what the step before it handed on, so a file finished since then
    is still in it: COMPLETED by an earlier attempt of this step, by the run this one
    re-executes (killed in `progress_update` after some files), or by crash recovery once
    that run died. Taking such a file up again (`ProgressStore.hold` moves a COMPLETED
    record through PENDING, where the sensor may requeue it) would write its COMPLETED
    record and its materializations a second time, and commit its dataset again. A file
    this very run gave up in an earlier attempt stays given up."""
    done = [_settled(settings, ctx, f) for f in files]
    skipped = [f.name for f, was in zip(done, files, strict=True) if was.in_run and f.outcome is Outcome.SKIPPED]
    if skipped:  # one line a step, not one a file
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.info(f"{context.op.name}: {len(skipped)} file(s) already COMPLETED, not processed again: {shown}")
    return done


def _settled(settings: Settings, ctx: StepContext, file: FileInRun) -> FileInRun:
    if not file.in_run:
        return file
    record = ctx.store.get(_identity(settings, file)[0])
    if record is None:
        return file
    version = file.version.sha256 if file.version else None  # another version is a new run's
    if record.status is ProcessingStatus.COMPLETED and version and record.checksum == version:
        return file.out(Outcome.SKIPPED, f"already COMPLETED by run {record.run_id}")
    if record.status is ProcessingStatus.FAILED and record.run_id == ctx.claimant.run_id:
        return file.out(Outcome.FAILED, record.error_details or "")
    return file
