"""A warm process that forks run workers: each run starts in milliseconds, not seconds.

Dagster's default launcher starts every run in a fresh interpreter that imports Dagster
and the code location again: about 2.3 CPU-s and 2-3 s before the first step, per run,
which for small files is most of the work (docs/performance.md, "Many small files"). The
zygote imports all of that once; for each run it forks a child (copy-on-write: the
imported modules are shared, not copied) that executes the run exactly as `dagster api
execute_run` does (`_execute_run_command_body`: the "Started process" event, the
cancellation thread, the run's events). It stays single-threaded and opens no
connection, so forking it is safe.

Protocol on stdin/stdout, one JSON object per line: `{"run_id": ..., "instance_ref": ...}`
in, `{"pid": ...}` out. A child starts its own session, so stopping the zygote (or the
daemon that owns it) never stops a run in flight. EOF on stdin ends the zygote.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

# pyarrow is not imported by the definitions (the code server never needs it), so here by name
PRELOAD = (
    "dagster",
    "s3proc_dagster.definitions",
    "s3proc_dagster.pipeline",
    "s3proc_dagster.reports.sources",
    "boto3",
    "duckdb",
    "pyarrow.compute",
    "pyarrow.parquet",
)


def _preload() -> None:
    """Everything a run would import, imported once, here."""
    import importlib

    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)  # as `dagster dev` gives its code servers
    for module in PRELOAD:
        importlib.import_module(module)
    from s3proc_dagster.definitions import defs
    from s3proc_dagster.files import tabular
    from s3proc_dagster.transfer import client

    defs()  # load the definitions once, so a child finds them built
    client.warm_up()  # and botocore's S3 model parsed: 17 MB less in every run (docs/performance.md)
    try:  # and DuckDB's and pyarrow's setup made: 40 MB and 0.25 CPU-s less in every run
        tabular.warm_up()
    except Exception as exc:  # a saving, not a need: a full or read-only temp folder costs only it
        print(
            f"s3proc zygote: the conversion warm-up failed ({type(exc).__name__}: {exc}); runs start cold",
            file=sys.stderr,
        )


def _child(run_id: str, instance_ref: str) -> int:
    """Runs in the forked child: the run, as `dagster api execute_run` executes it."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._core.instance import DagsterInstance
    from dagster_shared.serdes import deserialize_value

    from s3proc_dagster.files.private import PRIVATE_UMASK

    os.setsid()
    # The run's files are the users' data: the staged copies, the Parquet parts pyarrow
    # and DuckDB write, the extracted archive entries. Under this umask every writer makes
    # them 0600 (folders 0700) without being told; the child is the run's own process,
    # so the umask is nobody else's (the zygote keeps its own for the next fork).
    os.umask(PRIVATE_UMASK)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # termination arrives as SIGINT
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # stdout is the zygote's reply pipe: the run's output goes where its errors go
    with DagsterInstance.from_ref(deserialize_value(instance_ref)) as instance:
        return _execute_run_command_body(run_id, instance, lambda _event: None, set_exit_code_on_failure=True)


def main() -> int:
    # Copy-on-write keeps the imported modules shared with every child only while nobody
    # writes their pages, and a garbage collection writes to every object it visits: so no
    # collection here, and what was imported is frozen out of the children's collections
    # (Python's `gc.freeze` advice for fork without exec). Measured: see docs/performance.md.
    gc.disable()
    _preload()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner stops us by closing stdin
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        gc.freeze()  # and what this loop made since
        pid = os.fork()
        if pid == 0:
            gc.enable()
            code = 1
            try:
                code = _child(request["run_id"], request["instance_ref"])
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
