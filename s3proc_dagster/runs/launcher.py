"""`WarmRunLauncher`: Dagster's run launcher for this code location, with warm starts and health checks.

Configured in the instance's `dagster.yaml` (`runs/instance.py`, which `s3proc dev` writes):

    run_launcher:
      module: s3proc_dagster.runs.launcher
      class: WarmRunLauncher
    run_coordinator:            # Dagster's queue, which also warms the launcher up (below)
      module: s3proc_dagster.runs.launcher
      class: WarmQueuedRunCoordinator

It does what the default launcher does (one process per run, the run's events and
status in the instance), with two differences:

- **Warm starts.** Runs are forked from a `zygote` that has imported Dagster and the code
  location once, instead of spawned into a fresh interpreter that imports them again:
  the fixed cost of a run drops from seconds to milliseconds, which is what makes one run
  per small file affordable. The zygote is restarted when the code location's files
  change, so an edit is picked up by the next run as with `dagster dev`'s reload, and
  started as the daemon starts, so the first run does not wait for it either.
- **Worker health.** `check_run_worker_health` answers from the run's heartbeat
  (`runs.liveness`), so Dagster's own run monitoring marks a SIGKILLed or OOM-killed run
  failed, which the default launcher cannot see.

Runs execute on the host of the process that launches them (the daemon). For one pod per
run, use dagster-k8s's `K8sRunLauncher` instead (see `deploy/`); the heartbeat keeps
working there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster_shared.serdes import serialize_value

from s3proc_dagster.runs.liveness import IN_FLIGHT, is_run_alive, last_beat

PACKAGE = Path(__file__).resolve().parents[1]
WATCHED_FOR_CHANGES = (PACKAGE, PACKAGE.parent / "dbt_like_sql")


def code_fingerprint() -> int:
    """The newest modification time under the code location's files: a change restarts the zygote."""
    newest = 0
    for root in WATCHED_FOR_CHANGES:
        for path, _dirs, files in os.walk(root):
            for name in files:
                if name.endswith((".py", ".sql", ".yml", ".yaml")):
                    newest = max(newest, os.stat(os.path.join(path, name)).st_mtime_ns)
    return newest


class WarmQueuedRunCoordinator(QueuedRunCoordinator):
    """Dagster's `QueuedRunCoordinator`, which also has the daemon warm its run launcher up.

    The daemon builds its coordinator as it starts (it reads the dequeue interval), but its
    launcher only at the first launch: without this the first run after a start waits for
    the zygote's imports (about 2.7 s here), a lone small file's largest delay."""

    def register_instance(self, instance: dg.DagsterInstance) -> None:
        super().register_instance(instance)
        if _in_daemon():
            threading.Thread(target=_warm_up, args=(instance,), name="s3proc-zygote-warm-up", daemon=True).start()


def _warm_up(instance: dg.DagsterInstance) -> None:
    with contextlib.suppress(Exception):  # the first launch builds the launcher again and says why not
        launcher = instance.run_launcher
        if isinstance(launcher, WarmRunLauncher):
            launcher.warm_up()


def _in_daemon() -> bool:
    """Whether this process is Dagster's daemon (`dagster-daemon run`, or `python -m
    dagster._daemon` as `dagster dev` starts it): with the queued run coordinator only the
    daemon launches runs. The webserver and code servers build the launcher too (the UI
    shows its name), and a warm process of their own would only hold memory."""
    entry = Path(sys.argv[0])
    return entry.name == "dagster-daemon" or (entry.parent.name == "_daemon" and entry.parent.parent.name == "dagster")


class _Zygote:
    """The warm process, spoken to over a pipe; one per launcher."""

    def __init__(self) -> None:
        self.fingerprint = code_fingerprint()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "s3proc_dagster.runs.zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C is the daemon's to handle, not ours
        )
        self._expect("ready")

    def _expect(self, key: str) -> Any:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the run zygote exited (code {self.process.poll()}); see the daemon's output")
        return json.loads(line)[key]

    def fork(self, run_id: str, instance_ref: str) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"run_id": run_id, "instance_ref": instance_ref}) + "\n")
        self.process.stdin.flush()
        return int(self._expect("pid"))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # EOF: the zygote exits; runs it forked go on
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        self._inst_data = inst_data
        self._zygote: _Zygote | None = None
        self._lock = threading.Lock()  # the daemon may launch from several dequeue threads
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def warm_up(self) -> None:
        """Start the zygote now, so the first run does not wait for its imports."""
        with self._lock:
            self._ready_zygote()

    def _ready_zygote(self) -> _Zygote:
        """The zygote forks come from, started or restarted when missing, dead or stale; under `_lock`."""
        if self._zygote is None or not self._zygote.alive() or self._zygote.fingerprint != code_fingerprint():
            if self._zygote is not None:
                self._zygote.stop()
            self._zygote = _Zygote()
        return self._zygote

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        instance_ref = serialize_value(self._instance.get_ref())
        with self._lock:
            pid = self._ready_zygote().fork(run.run_id, instance_ref)
        self._instance.report_engine_event(f"Run forked from the warm run zygote (pid {pid}).", run, cls=self.__class__)

    def terminate(self, run_id: str) -> bool:
        """Cancel a run: SIGINT to its worker, found by its heartbeat (this host only)."""
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        beat = last_beat(self._instance, run_id)
        if beat is None or beat.host != socket.gethostname():
            return False
        try:
            os.kill(beat.pid, signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        if run.status not in IN_FLIGHT:
            return CheckRunHealthResult(
                WorkerStatus.SUCCESS if run.status == dg.DagsterRunStatus.SUCCESS else WorkerStatus.UNKNOWN
            )
        if is_run_alive(self._instance, run.run_id):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, "the run's worker is gone: no heartbeat (killed or crashed)")

    def dispose(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
