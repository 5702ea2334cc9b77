"""The Dagster instance the product runs on: its `dagster.yaml`, and its storage made ready.

`s3proc dev` writes it for one machine; the chart's values (`deploy/values.yaml`) say the
same for a cluster, and `test_deploy.py` holds the two together.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from s3proc_dagster.files.private import make_private_dir
from s3proc_dagster.names import FILE_ID_TAG

#: The PostgreSQL database of a deployment's Dagster instance (`postgresql://user:password@host:5432/db`).
#: The dagster.yaml names the variable, not its value, so no password is written to a file.
POSTGRES_URL_ENV = "DAGSTER_POSTGRES_URL"


def instance_storage(storage_dir: Path) -> dict:
    """Where the instance keeps runs, event logs and schedules: PostgreSQL (dagster-postgres)
    when DAGSTER_POSTGRES_URL is set, the production setting, which every webserver, daemon
    and run worker of a deployment share; otherwise SQLite files in `storage_dir`, for one
    machine, laid out as Dagster's `sqlite` storage lays them out, with an event log that
    keeps its connections (`runs.sqlite_storage`). Dagster reads the URL when the instance loads
    (`env:`), in each process."""
    if os.environ.get(POSTGRES_URL_ENV):
        return {"postgres": {"postgres_url": {"env": POSTGRES_URL_ENV}}}
    return {
        "custom": {
            "module": "s3proc_dagster.runs.sqlite_storage",
            "class": "SqliteStorage",
            "config": {"base_dir": str(storage_dir)},
        }
    }


# Over 60 lines: one dict literal, the whole dagster.yaml, with a comment per choice.
def instance_config(
    max_concurrency: int, storage_dir: Path, upload_pool_limit: int | None = None, warm_runs: bool = True
) -> dict:
    """The instance settings the product expects; see docs/operating.md, "The instance".

    - runs, events and schedules in PostgreSQL when DAGSTER_POSTGRES_URL is set, else in
      SQLite under `storage_dir` (`instance_storage`);
    - the run queue starts at most MAX_CONCURRENCY runs at once (and honours
      `dagster/priority`), checking every second and launching on as many threads, so a
      slot that frees is filled at once, not one launch per daemon loop;
    - runs are forked warm (`runs.launcher.WarmRunLauncher`): a run's fixed cost is what
      its steps do, not an interpreter importing Dagster again; `warm_runs=False` keeps
      Dagster's default launcher (a fresh process per run);
    - at most one run per file leaves the queue at a time (a tag concurrency limit per
      `s3proc/file_id`), so a backfill or a double click cannot start duplicates; the
      store's claim makes the same true for runs that skip the queue;
    - the `s3_uploads` pool bounds concurrent upload steps across all runs;
    - sensors tick in the daemon's threads, so a watch sensor's tick can wait for arrivals;
    - the runs' stdout and stderr are kept for the UI and mirrored back by a thread
      (`runs.compute_logs`), not by four helper processes a run;
    - run retries stay off for op failures (`retry_on_asset_or_op_failure: false`): ops
      already retry with backoff, and the two would multiply.
    """
    return {
        "storage": instance_storage(storage_dir),
        "concurrency": {
            "runs": {
                "max_concurrent_runs": max_concurrency,
                "tag_concurrency_limits": [
                    {"key": FILE_ID_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
                ],
            },
            "pools": {"default_limit": upload_pool_limit or max(2, max_concurrency)},
        },
        "run_coordinator": {
            # the warm one also starts the launcher's warm process as the daemon starts
            **(
                {"module": "s3proc_dagster.runs.launcher", "class": "WarmQueuedRunCoordinator"}
                if warm_runs
                else {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
            ),
            "config": {
                "dequeue_interval_seconds": 1,
                "dequeue_use_threads": True,
                "dequeue_num_workers": max(2, max_concurrency),
            },
        },
        **(
            {"run_launcher": {"module": "s3proc_dagster.runs.launcher", "class": "WarmRunLauncher"}}
            if warm_runs
            else {}
        ),
        # sensors in the daemon's threads: a watch sensor's tick then waits for arrivals for
        # most of the daemon's 5-s loop (`defs/files/sensors.py`) without holding the others back
        "sensors": {"use_threads": True, "num_workers": 4},
        "run_retries": {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": False},
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": 180,
            "poll_interval_seconds": 30,
            "free_slots_after_run_end_seconds": 30,  # pool slots a crashed step held come back
        },
        # the product's own `s3proc` log lines show in each run's logs in the UI; DEBUG lets
        # every one through, the level they are written at is LOG_LEVEL's (logs.py)
        "python_logs": {"managed_python_loggers": ["s3proc"], "python_log_level": "DEBUG"},
        # the runs' stdout and stderr in files for the UI, mirrored back by a thread, not by
        # four processes a run (`runs/compute_logs.py`)
        "compute_logs": {
            "module": "s3proc_dagster.runs.compute_logs",
            "class": "MirroringComputeLogManager",
            "config": {"base_dir": str(storage_dir)},
        },
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }


def prepare_storage(dagster_home: Path) -> None:
    """Create the instance's tables and the upload pool's row before any process uses them.

    `dagster dev` starts its webserver, daemon and code server at once, and on an empty
    PostgreSQL database each would race to create the tables; and Dagster creates a pool's
    row when a run first claims a slot, so two runs claiming at once on PostgreSQL left one
    failed (`InFailedSqlTransaction` after the duplicate key). Done once here, neither race
    can happen."""
    import dagster as dg

    from s3proc_dagster.names import UPLOAD_POOL

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default(UPLOAD_POOL)


def write_instance(dagster_home: Path, max_concurrency: int) -> Path:
    make_private_dir(dagster_home)  # runs' event logs and tags: a new one is the service's user's alone
    path = dagster_home / "dagster.yaml"
    path.write_text(yaml.safe_dump(instance_config(max_concurrency, dagster_home / "storage"), sort_keys=False))
    return path
