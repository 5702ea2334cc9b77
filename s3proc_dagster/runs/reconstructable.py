"""The code location's jobs as module-level functions, for `dg.reconstructable`.

`dg.execute_job` needs a job another process can rebuild: a run worker, a step of the
multiprocess executor, a re-execution from failure import this module and call the
function by name. So a caller outside the code location (the tests, a node of
benchmarks/nodes.py) runs the definitions' own job, resources bound, with nothing of its
own for those processes to import.
"""

from __future__ import annotations

import functools

import dagster as dg


@functools.cache
def definitions() -> dg.Definitions:
    """The code location's definitions, loaded as Dagster loads them. Cached: they hold no
    setting (resources read the environment when a run or a tick starts)."""
    from s3proc_dagster.definitions import defs

    return defs()


def process_file_job_with_resources() -> dg.JobDefinition:
    return definitions().resolve_job_def("process_file_job")


def process_files_job_with_resources() -> dg.JobDefinition:
    return definitions().resolve_job_def("process_files_job")


def image_request_job_with_resources() -> dg.JobDefinition:
    return definitions().resolve_job_def("image_request_job")


def reconcile_job_with_resources() -> dg.JobDefinition:
    return definitions().resolve_job_def("reconcile_job")
