"""Runs started outside the sensors, made exactly as the sensors make theirs.

`s3proc process` and `s3proc images submit` run a job now, in this process, and wait:
the point is to see the outcome in the terminal. Dagster's `execute_job` would do that,
but the run it creates has no code-location origin, so the UI cannot re-execute it
("Expected non-None value"). So the run is created the way `dagster job launch` and the
daemon create theirs, against the code location loaded in-process under the name the
workspace gives it (`s3proc_dagster`): it carries the remote job origin the UI's
"Re-execute from failure" looks up, and the same tags as the sensor's RunRequest. Then
it executes here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._utils.hosted_user_process import recon_job_from_origin

from s3proc_dagster.files.private import private_umask

# Both as in workspace.yaml and [tool.dagster]: the UI finds re-executions by these names.
LOCATION_NAME = "s3proc_dagster"
MODULE = "s3proc_dagster.definitions"


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    success: bool


@contextmanager
def code_location(instance: dg.DagsterInstance) -> Iterator[CodeLocation]:
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=MODULE, working_directory=os.getcwd()),
        location_name=LOCATION_NAME,
    )
    with origin.create_location(instance) as location:
        yield location


def create_run(instance: dg.DagsterInstance, location: CodeLocation, request: dg.RunRequest) -> dg.DagsterRun:
    """A run of `request.job_name` with the request's config and tags, as the daemon makes it."""
    (repo,) = location.get_repositories().values()
    remote_job = repo.get_full_job(request.job_name)
    run_config = dict(request.run_config or {})
    plan = location.get_execution_plan(
        remote_job, run_config, step_keys_to_execute=None, known_state=None, instance=instance
    )
    return instance.create_run(
        job_name=remote_job.name,
        run_id=None,
        run_config=run_config,
        resolved_op_selection=None,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        op_selection=None,
        status=None,
        root_run_id=None,
        parent_run_id=None,
        tags={**remote_job.tags, **(request.tags or {})},
        job_snapshot=remote_job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=remote_job.parent_job_snapshot,
        remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(),
        asset_selection=None,
        asset_check_selection=None,
        asset_graph=repo.asset_graph,
    )


def run_now(instance: dg.DagsterInstance, request: dg.RunRequest) -> RunOutcome:
    """Create the run as the sensor's would be, execute it in this process, return how it ended."""
    with code_location(instance) as location:
        run = create_run(instance, location, request)
    job_origin = run.job_code_origin
    assert job_origin is not None
    # The steps run in this process, as in a forked run worker (runs/zygote.py), and
    # write the users' data into the staging area: 0600 files and 0700 folders, whoever
    # writes them; the terminal's umask is back once the run has ended.
    with private_umask():
        result = execute_run(recon_job_from_origin(job_origin), run, instance)
    return RunOutcome(run.run_id, result.success)
