"""Processes a test run left behind: servers its fixtures or tests started and never stopped.

Every process the suite starts inherits `S3PROC_TEST_SESSION` (`.ci/run` sets it for the
whole CI run; conftest sets it for a plain `pytest`), and keeps it when its parent dies
and it is re-parented to PID 1, where its ancestry no longer says whose it is. So "ours"
is exactly "carries our marker": another checkout's or another worker's servers on the
same machine are never listed, let alone killed. A process that a test starts with an
environment of its own must pass the marker on (test_dev_launcher.py does). The test suite,
`.ci/run` and the benchmarks all look through this module, which is why it lives with the
servers it looks for (`embedded.py`, `processes.py`) rather than among the tests.

    python -m s3proc_dagster.cli.leftovers "$S3PROC_TEST_SESSION"   # exit 1 and list them
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterable

import psutil

SESSION_ENV = "S3PROC_TEST_SESSION"

#: What we expect a leak to be, to label the listing (any marked process is reported):
#: executables by name, and Python entry points by the module and subcommand they run.
BINARIES = {
    "weed": "SeaweedFS",
    "nx-27017": "nx-27017 (MongoDB)",
    "postgres": "PostgreSQL",
    "chromium": "chromium",
    "dagster-daemon": "dagster-daemon",
    "dagster-webserver": "dagster-webserver",
    "moto_server": "moto server",
}
MODULES = (
    (("dagster_webserver",), "dagster-webserver"),
    (("dagster._daemon",), "dagster-daemon"),
    (("dagster", "dev"), "dagster dev"),
    (("dagster", "code-server"), "dagster code server"),
    (("dagster", "api", "grpc"), "dagster code server"),
    (("dagster", "api", "execute_run"), "dagster run worker"),
    (("s3proc_dagster.cli", "dev"), "s3proc dev"),
)


def kind(cmdline: list[str]) -> str:
    """What a process is, from its command line: `weed`, `python -m dagster dev`, ..."""
    if not cmdline:
        return "other"
    name, rest = os.path.basename(cmdline[0]), cmdline[1:]
    if name.startswith("python") and rest and not rest[0].startswith("-"):
        name, rest = os.path.basename(rest[0]), rest[1:]  # a console script: python .venv/bin/nx-27017 ...
    if name in BINARIES:
        return BINARIES[name]
    args = cmdline[cmdline.index("-m") + 1 :] if "-m" in cmdline else [name, *rest]
    for prefix, label in MODULES:
        if tuple(args[: len(prefix)]) == prefix:
            return label
    return "other"


#: Helpers multiprocessing starts for a process and that end when it ends (they read a pipe
#: only their parent holds): while their parent is us or an ancestor, they are not a leak.
LIFETIME_BOUND = ("from multiprocessing.resource_tracker import main", "from multiprocessing.forkserver import main")


def _marked(session: str, skip: set[int]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue  # holds no port and no memory; only its (dead) parent could reap it
            if proc.ppid() in skip and any(helper in " ".join(proc.cmdline()) for helper in LIFETIME_BOUND):
                continue
            if proc.environ().get(SESSION_ENV) == session:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def find_leftovers(session: str, grace_s: float = 10.0, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes carrying `session`, other than us and our ancestors (the shell that
    runs the check), still there after `grace_s`: a server that is shutting down on its
    own (a CLI's code server after its heartbeat) gets that long to finish."""
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents()), *exclude}
    deadline = time.monotonic() + grace_s
    while (found := _marked(session, skip)) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling interval, bounded by the grace period
    return found


def describe(proc: psutil.Process) -> str:
    """One line a person can act on: what it is, since when, where, and its command."""
    try:
        with proc.oneshot():
            args = proc.cmdline()
            age = time.time() - proc.create_time()
            return (
                f"pid {proc.pid} ppid {proc.ppid()} pgid {os.getpgid(proc.pid)} {kind(args)}, {age:.0f}s old, "
                f"cwd {proc.cwd()}: {' '.join(args)[:300]}"
            )
    except (psutil.Error, OSError):
        return f"pid {proc.pid} (gone while listing)"


def kill(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL each listed process by its pid (they carry our marker, so they are ours)."""
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("session", help=f"the value of {SESSION_ENV} the run was started with")
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds a process may still take to exit (default 10)"
    )
    parser.add_argument("--keep", action="store_true", help="list them but leave them running")
    args = parser.parse_args(argv)
    leftovers = find_leftovers(args.session, args.grace)
    if not leftovers:
        print(f"leftover processes: none (session {args.session})")
        return 0
    print(
        f"leftover processes: {len(leftovers)} still running after the tests (session {args.session}):", file=sys.stderr
    )
    for proc in leftovers:
        print(f"  {describe(proc)}", file=sys.stderr)
    if not args.keep:
        kill(leftovers)
        print("  (killed)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
