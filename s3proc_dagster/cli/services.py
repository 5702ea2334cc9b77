"""The Dagster services `s3proc dev` runs: a code server, the webserver and the daemon.

`dagster dev` starts the same three, and stays beside them as a Python process that has
imported all of Dagster only to watch them: 100 MB of PSS, a tenth of the tree at four
runs (docs/performance.md). Started here instead, the tree is the three and what they
start. The code server is Dagster's own (`dagster code-server start`, as `dagster dev`
starts it), so *Reload definitions* in the UI loads the code again, a new `defs.yaml`
included; the webserver and the daemon reach it through a workspace file in DAGSTER_HOME
naming its port, as `dagster dev`'s temporary one does.

Each runs in a session of its own (`start_in_own_group`); the first to exit ends the
others, and a stop reaches the webserver and the daemon before the code server they use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from s3proc_dagster.cli.processes import (
    ServerStartError,
    free_port,
    port_in_use,
    start_in_own_group,
    stop_process_group,
)

#: Written beside dagster.yaml: the code server's address, for the webserver and the daemon.
WORKSPACE_FILE = "s3proc-dev-workspace.yaml"
CODE_SERVER_START_DEADLINE_S = 120.0
POLL_S = 0.2


#: The daemon and the webserver stop first, together; the code server serves them to the end.
CLIENTS, SERVERS = ("daemon", "webserver"), ("code server",)


@dataclass
class DagsterServices:
    """The three processes, by name, as they have started."""

    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def exited(self) -> tuple[str, int] | None:
        """(name, exit code) of the first that has exited, if one has."""
        return next(((name, p.returncode) for name, p in self.processes.items() if p.poll() is not None), None)

    def poll(self) -> int | None:
        """As `Popen.poll`, for `wait_for_ui`: the exit code of one that has exited."""
        gone = self.exited()
        return None if gone is None else gone[1]

    def wait(self) -> int:
        """Until one exits (none should before a stop): its exit code."""
        while (gone := self.exited()) is None:
            time.sleep(POLL_S)  # polling interval: a Popen cannot be waited on with others
        name, code = gone
        print(f"the Dagster {name} exited with code {code}: stopping the others", file=sys.stderr, flush=True)
        return code

    def stop(self, deadline_s: float) -> list[str]:
        """Each stopped as Ctrl-C stops it (SIGINT to its group) within `deadline_s`: the
        webserver and the daemon at once, then the code server; the names of those that
        had to be killed."""

        def stop(name: str) -> str | None:
            code = stop_process_group(self.processes[name], deadline_s, signal.SIGINT)
            return name if code == -signal.SIGKILL else None

        first, last = [n for n in CLIENTS if n in self.processes], [n for n in SERVERS if n in self.processes]
        with ThreadPoolExecutor(max_workers=len(CLIENTS)) as pool:
            killed = list(pool.map(stop, first))
        return [name for name in (*killed, *map(stop, last)) if name]


def start_services(
    root: Path, dagster_home: Path, host: str, port: int, log_level: str, log_format: str, services: DagsterServices
) -> None:
    """The code server, then (once it listens) the webserver and the daemon, each added to
    `services` as it starts, so that a stop during the start stops what has started."""
    location = _location(root / "workspace.yaml")
    grpc_port = free_port(avoid={port})  # the webserver binds `port` only later
    env = {**os.environ, "DAGSTER_IS_DEV_CLI": "1"}  # as `dagster dev` gives its services
    module, name = location["module_name"], location["location_name"]
    level = "debug" if log_level == "debug" else "warning"  # as `dagster dev` has its code servers log
    # (a module and a location name are identifiers: no space to split on)
    args = f"-h 127.0.0.1 -p {grpc_port} -m {module} --location-name {name} --log-level {level}".split()
    # each service's own lines in LOG_PRETTY's format: the code server's too, and those of the
    # `dagster api grpc` process it starts, which takes no such option from it, only from the
    # variable Dagster's command line reads for it (auto_envvar_prefix DAGSTER_CLI)
    logs = ["--log-format", log_format]
    server_env = {**env, "DAGSTER_CLI_API_GRPC_LOG_FORMAT": log_format}
    code_server = start_in_own_group(
        [sys.executable, "-m", "dagster", "code-server", "start", *args, *logs, "-d", str(root)],
        cwd=root,
        env=server_env,
    )
    services.processes["code server"] = code_server
    _wait_for_port(code_server, grpc_port)
    workspace = dagster_home / WORKSPACE_FILE
    grpc = {"host": "127.0.0.1", "port": grpc_port, "location_name": name}
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": grpc}]}, sort_keys=False))
    webserver = [sys.executable, "-m", "dagster_webserver", "-w", str(workspace), "-h", host, "-p", str(port)]
    services.processes["webserver"] = start_in_own_group(
        [*webserver, "--dagster-log-level", log_level, *logs], cwd=root, env=env
    )
    # warnings only below debug, like the code server: at info the daemon says three lines
    # every 5 s ("Checking for new runs for sensor...") that bury the runs' own lines
    daemon = [sys.executable, "-m", "dagster._daemon", "run", "-w", str(workspace), "--log-level", level]
    services.processes["daemon"] = start_in_own_group([*daemon, *logs], cwd=root, env=env)


def _location(workspace: Path) -> dict[str, str]:
    """The project's one code location, as its workspace.yaml names it."""
    (entry,) = yaml.safe_load(workspace.read_text())["load_from"]
    return entry["python_module"]


def _wait_for_port(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + CODE_SERVER_START_DEADLINE_S
    while not port_in_use(port):
        if proc.poll() is not None:
            raise ServerStartError(f"the Dagster code server exited with code {proc.returncode} (its output is above)")
        if time.monotonic() > deadline:
            raise ServerStartError(f"the Dagster code server did not listen on port {port} within the deadline")
        time.sleep(POLL_S)  # polling interval, bounded by the deadline
