"""Running `process_file_job` for named files through the Dagster instance.

`s3proc process` and the tests use this, so a run started from the command line is a
real run of the instance: it shows in the UI, with the same tags as a sensor's run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from s3proc_dagster.launcher import write_instance


def get_instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME (created like `scripts/dev` does if it is not set)."""
    if not os.environ.get("DAGSTER_HOME"):
        home = Path.cwd() / ".dagster_home"
        if not (home / "dagster.yaml").exists():
            write_instance(home, int(os.environ.get("MAX_CONCURRENCY", "4")))
        os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def process_file_job_with_resources() -> dg.JobDefinition:
    """Module-level so that `dg.reconstructable` can rebuild the job in a run worker."""
    from s3proc_dagster.definitions import defs

    return defs.resolve_job_def("process_file_job")


@dataclass(frozen=True)
class RunOutcome:
    path: str
    run_id: str
    success: bool


def run_file(path: str, relative_path: str, instance: dg.DagsterInstance, tags: dict[str, str] | None = None) -> RunOutcome:
    from s3proc_dagster.defs.files.sensors import run_request_for

    request = run_request_for(path, relative_path, run_key="")
    result = dg.execute_job(
        dg.reconstructable(process_file_job_with_resources),
        instance=instance,
        run_config=request.run_config,
        tags={**request.tags, **(tags or {})},
    )
    return RunOutcome(path, result.run_id, result.success)


def relative_to_watch(path: Path, watch_path: Path) -> str:
    try:
        return path.resolve().relative_to(watch_path.resolve()).as_posix()
    except ValueError:
        return path.name
