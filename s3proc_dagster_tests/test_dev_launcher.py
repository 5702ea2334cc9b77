"""`s3proc dev` as a user runs it: a signal stops the whole tree, a taken port stops the start, the `.env` it writes is its owner's alone.

Each test runs `s3proc dev` (or `scripts/dev`) as a subprocess in its own directory (its
own `.env`, `DAGSTER_HOME`, `./data` and embedded SeaweedFS) on free ports, with SIGINT
ignored as a job started with `&` by a non-interactive shell has it: the case in which
Dagster also ignores SIGTERM, and in which `dagster dev` and `weed` used to outlive the
launcher.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from s3proc_dagster.cli.dev import (
    DAGSTER_STOP_DEADLINE_S,
    DEV_ENV_HEADER,
    UI_URL_ENV,
    UI_URL_FILE,
    record_ui_url_in_dotenv,
    write_dev_env,
)
from s3proc_dagster.cli.leftovers import SESSION_ENV
from s3proc_dagster.cli.processes import alive, free_port, port_in_use, start_in_own_group, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
#: The launcher gets only these from our environment: the session fixtures put the shared
#: deployment's settings (S3_ENDPOINT, DAGSTER_HOME, ...) into os.environ.
PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", SESSION_ENV)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def dev_env(ui_port: int, s3_port: int) -> dict[str, str]:
    env = {key: os.environ[key] for key in PASSED_ON if key in os.environ}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "S3PROC_UI_PORT": str(ui_port),
        "S3PROC_SEAWEEDFS_PORT": str(s3_port),
        "REPORTS_AUTO_REFRESH": "false",
    }


def processes_under(directory: Path) -> list[psutil.Process]:
    """Live processes working in, or naming, `directory`: whatever `s3proc dev` started
    there, found even if it was orphaned and is no longer anyone's descendant."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            cwd = Path(proc.cwd())
            if cwd == directory or directory in cwd.parents or any(str(directory) in arg for arg in proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until(condition, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)  # polling interval, bounded by the deadline


LAUNCHER = [sys.executable, "-m", "s3proc_dagster.cli", "dev"]


def as_checkout(directory: Path) -> list[str]:
    """`directory` laid out as a checkout for `scripts/dev`, which runs in the directory it
    lives in: its scripts, `pyproject.toml` and a `.venv` whose `python` and `s3proc` are the
    project's, stamped as installed after `pyproject.toml`, so `scripts/bootstrap` has
    nothing to do (and could never reinstall the project's environment from here).
    Returns the command that starts it there."""
    (directory / "scripts").mkdir()
    for script in ("dev", "bootstrap"):
        shutil.copy2(ROOT / "scripts" / script, directory / "scripts" / script)
    shutil.copy2(ROOT / "pyproject.toml", directory / "pyproject.toml")
    bin_dir = directory / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "s3proc"):
        (bin_dir / name).symlink_to(Path(sys.executable).parent / name)
    (directory / ".venv" / ".s3proc-installed").touch()
    return [str(directory / "scripts" / "dev")]


@contextmanager
def s3proc_dev(
    directory: Path, ui_port: int, s3_port: int, command: list[str] = LAUNCHER, **env: str
) -> Iterator[subprocess.Popen]:
    """`command` in `directory` with SIGINT ignored and in a session of its own, as
    `setsid scripts/dev &` starts it; whatever happens in the test, it and everything it
    started are gone afterwards (a deadline, then SIGKILL of its process group)."""
    shutil.copy(ROOT / "workspace.yaml", directory / "workspace.yaml")
    with (directory / "dev.log").open("w") as log:
        proc = subprocess.Popen(
            command,
            cwd=directory,
            env={**dev_env(ui_port, s3_port), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_ignore_sigint,  # noqa: PLW1509 - reproduces a shell's `&`, before any thread
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stragglers = processes_under(directory)
            stop_process_group(proc, deadline_s=30)
            for straggler in alive(stragglers + processes_under(directory)):
                straggler.kill()  # only if the launcher failed at its job; the test has failed then


def ui_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def describe(processes: list[psutil.Process]) -> list[str]:
    out = []
    for proc in processes:
        with suppress(psutil.NoSuchProcess):
            out.append(f"{proc.pid}: {' '.join(proc.cmdline())[:160]}")
    return out


def wait_for_ui(launcher: subprocess.Popen, ui_port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while not ui_answers(ui_port):
        assert launcher.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the UI did not answer:\n" + log.read_text()[-3000:]
        time.sleep(0.2)  # polling interval, bounded by the deadline
    wait_until(lambda: f"UI on http://127.0.0.1:{ui_port}" in log.read_text(), 10, "no 'UI on' line")


# `s3proc dev` started by the test itself (SeaweedFS, Dagster's services), not by a fixture.
@pytest.mark.servers
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signal_stops_dagster_and_seaweedfs_and_frees_both_ports(
    sig: signal.Signals, tmp_path: Path, world_readable_umask: None
) -> None:
    ui_port, s3_port = free_port(), free_port(with_grpc=True)
    log = tmp_path / "dev.log"
    with s3proc_dev(tmp_path, ui_port, s3_port) as launcher:
        wait_for_ui(launcher, ui_port, log)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        commands = "\n".join(describe(tree))
        for part in ("weed", "dagster code-server", "dagster api grpc", "dagster_webserver", "dagster._daemon"):
            assert part in commands, f"{part} not running under s3proc dev:\n{commands}"
        # and no `dagster dev` beside them, which only watches them (100 MB: services.py);
        # nor, in the launcher, the libraries of the commands it is not (cli/commands.py)
        assert "dagster dev" not in commands
        libraries = [m.path for m in psutil.Process(launcher.pid).memory_maps() if "-packages/" in m.path]
        assert not [p for p in libraries if "/pyarrow/" in p or "/PIL/" in p or "/duckdb" in p], libraries
        # the first start wrote the embedded settings, S3 keys included, for the owner's eyes only
        assert "S3_SECRET_ACCESS_KEY=" in (tmp_path / ".env").read_text()
        assert mode(tmp_path / ".env") == 0o600

        launcher.send_signal(sig)
        assert launcher.wait(timeout=30) == 0, log.read_text()[-3000:]
        wait_until(lambda: not alive(tree), 5, "still running:\n" + "\n".join(describe(alive(tree))))
        assert not alive(processes_under(tmp_path)), describe(alive(processes_under(tmp_path)))
        wait_until(lambda: not port_in_use(ui_port) and not port_in_use(s3_port), 10, "a port is still taken")


@pytest.mark.servers  # starts SeaweedFS and Dagster's processes (scripts/dev)
def test_sigint_to_a_backgrounded_scripts_dev_stops_it_and_dagster_cleanly(tmp_path: Path) -> None:
    """`setsid scripts/dev &`, then `kill -INT -PGID`: SIGINT arrives at a process that
    started with it ignored, and is an explicit request to stop all the same. Under
    LOG_PRETTY=false LOG_LEVEL=debug, every line it printed is JSON but the launcher's own
    (the code server's and its `dagster api grpc` process's were colored text)."""
    ui_port, s3_port = free_port(), free_port(with_grpc=True)
    log = tmp_path / "dev.log"
    logs = {"LOG_PRETTY": "false", "LOG_LEVEL": "debug"}
    with s3proc_dev(tmp_path, ui_port, s3_port, command=as_checkout(tmp_path), **logs) as launcher:
        wait_for_ui(launcher, ui_port, log)
        wait_until(lambda: "Started Dagster code server" in log.read_text(), 10, "no code server line")
        tree = psutil.Process(launcher.pid).children(recursive=True)
        assert "dagster._daemon" in "\n".join(describe(tree)), describe(tree)
        url = f"http://127.0.0.1:{ui_port}"  # where `s3proc backfill` finds it: the .env it wrote, DAGSTER_HOME
        assert f"{UI_URL_ENV}={url}" in (tmp_path / ".env").read_text().splitlines()
        assert (tmp_path / ".dagster_home" / UI_URL_FILE).read_text().strip() == url

        os.killpg(launcher.pid, signal.SIGINT)
        stopped = time.monotonic()
        assert launcher.wait(timeout=DAGSTER_STOP_DEADLINE_S + 30) == 0, log.read_text()[-3000:]
        # each Dagster service stopped on its SIGINT, before the deadline at which it would be killed
        assert time.monotonic() - stopped < DAGSTER_STOP_DEADLINE_S, log.read_text()[-3000:]
        assert "SIGINT: stopping Dagster and SeaweedFS" in log.read_text()
        assert "killed with its group" not in log.read_text()
        launchers = ("SeaweedFS S3 endpoint: ", "Watching ", "UI on http", "SIGINT: stopping")
        lines = [line for line in log.read_text().splitlines() if line and not line.startswith(launchers)]
        assert [line for line in lines if not line.startswith("{")] == []
        wait_until(lambda: not alive(tree), 5, "still running:\n" + "\n".join(describe(alive(tree))))
        assert not alive(processes_under(tmp_path)), describe(alive(processes_under(tmp_path)))
        wait_until(lambda: not port_in_use(ui_port) and not port_in_use(s3_port), 10, "a port is still taken")


def test_the_ui_url_goes_only_into_a_dotenv_s3proc_dev_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCH_PATH", str(tmp_path / "incoming"))
    ours, users = tmp_path / "ours.env", tmp_path / "users.env"
    write_dev_env(ours)
    users.write_text("# my settings\nS3_BUCKET=mine\n")

    assert record_ui_url_in_dotenv(ours, "http://127.0.0.1:3001")
    assert record_ui_url_in_dotenv(ours, "http://127.0.0.1:3002")  # a later start on another port
    lines = ours.read_text().splitlines()
    assert lines[0].startswith("# Written by scripts/dev") and f"WATCH_PATH={tmp_path / 'incoming'}" in lines
    assert [line for line in lines if line.startswith(f"{UI_URL_ENV}=")] == [f"{UI_URL_ENV}=http://127.0.0.1:3002"]
    assert not record_ui_url_in_dotenv(users, "http://127.0.0.1:3001")
    assert users.read_text() == "# my settings\nS3_BUCKET=mine\n"
    assert not record_ui_url_in_dotenv(tmp_path / "missing.env", "http://127.0.0.1:3001")
    assert not (tmp_path / "missing.env").exists()


@contextmanager
def socket_listening_on(port: int) -> Iterator[None]:
    """Another server on `port`, as an orphaned `dagster dev` or `weed` would be."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


# `s3proc dev` and a listening socket, both started by the test itself, not by a fixture.
@pytest.mark.servers
@pytest.mark.parametrize("taken", ["ui", "seaweedfs", "s3_endpoint_in_dotenv"])
def test_a_taken_port_stops_the_start_at_once_naming_the_setting(taken: str, tmp_path: Path) -> None:
    ui_port, s3_port = free_port(), free_port(with_grpc=True)
    busy = ui_port if taken == "ui" else s3_port
    if taken == "s3_endpoint_in_dotenv":  # what the first start writes; later starts reuse it
        (tmp_path / ".env").write_text(f"S3_EMBEDDED=true\nS3_ENDPOINT=http://127.0.0.1:{busy}\n")
    shutil.copy(ROOT / "workspace.yaml", tmp_path / "workspace.yaml")
    with socket_listening_on(busy):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "s3proc_dagster.cli", "dev"],
            cwd=tmp_path,
            env=dev_env(ui_port, s3_port if taken != "s3_endpoint_in_dotenv" else free_port(True)),
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=_ignore_sigint,
            check=False,
        )
    assert result.returncode != 0
    assert time.monotonic() - started < 20
    expected = {
        "ui": ["--port", "S3PROC_UI_PORT", str(ui_port)],
        "seaweedfs": ["S3PROC_SEAWEEDFS_PORT", str(s3_port)],
        "s3_endpoint_in_dotenv": ["S3_ENDPOINT", ".env", str(busy)],
    }[taken]
    for word in expected:
        assert word in result.stderr, result.stderr
    assert "already in use" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "UI on" not in result.stdout
    assert not (tmp_path / "data" / "seaweedfs").exists() and not (tmp_path / ".dagster_home").exists()
    assert not alive(processes_under(tmp_path)), describe(alive(processes_under(tmp_path)))


def test_dev_help_describes_host_port_and_the_seaweedfs_port() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "dev", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for word in ("--host", "--port", "S3PROC_UI_PORT", "S3PROC_UI_HOST", "S3PROC_SEAWEEDFS_PORT", "SIGTERM"):
        assert word in result.stdout, result.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_dev_env_holding_the_s3_keys_is_created_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_readable_umask: None
) -> None:
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "dev-secret")
    write_dev_env(tmp_path / ".env")
    assert "S3_SECRET_ACCESS_KEY=dev-secret" in (tmp_path / ".env").read_text()
    assert mode(tmp_path / ".env") == 0o600


def test_a_users_env_is_left_as_it_is_and_an_older_launchers_env_is_made_0600(
    tmp_path: Path, world_readable_umask: None
) -> None:
    users, older = tmp_path / "user" / ".env", tmp_path / "older" / ".env"
    for path, text, permissions in (
        (users, "S3_BUCKET=mine\n", 0o640),
        (older, f"{DEV_ENV_HEADER}\nS3_SECRET_ACCESS_KEY=old\n", 0o644),
    ):
        path.parent.mkdir()
        path.write_text(text)
        path.chmod(permissions)
    write_dev_env(users)
    write_dev_env(older)
    assert users.read_text() == "S3_BUCKET=mine\n" and mode(users) == 0o640
    assert older.read_text() == f"{DEV_ENV_HEADER}\nS3_SECRET_ACCESS_KEY=old\n" and mode(older) == 0o600


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as `dagster dev` does when SIGINT was ignored
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_process_group_kills_a_group_that_ignores_its_signal_at_the_deadline() -> None:
    proc = start_in_own_group([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    assert os.getpgid(child.pid) == proc.pid  # the child shares its parent's group
    started = time.monotonic()
    assert stop_process_group(proc, deadline_s=1.0) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert not alive([child])
    proc.stdout.close()


def test_stop_process_group_never_signals_our_own_group() -> None:
    proc = subprocess.Popen(  # in our group; SIGTERM at its default even if ours is ignored (`&` + Dagster)
        [sys.executable, "-c", "import time; time.sleep(600)"],
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),  # noqa: PLW1509 - resets one signal only
    )
    assert stop_process_group(proc, deadline_s=5.0) == -signal.SIGTERM  # signalled alone; we are still here


class _Hangup(BaseException):
    pass


def test_a_stop_signal_while_a_server_starts_stops_that_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal lands while Popen runs (held back until it returns): no orphan is left."""
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen_then_hangup(*args, **kwargs) -> subprocess.Popen:
        started.append(real_popen(*args, **kwargs))
        # arrives "during" Popen, as a user's kill would reach the (single-threaded) launcher:
        # aimed at this thread, since pytest's process has other threads (the S3 proxy's),
        # which do not hold the signal back and to which the kernel may hand a process's kill
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGHUP)
        return started[-1]

    def hangup(_signum: int, _frame: object) -> None:
        raise _Hangup

    monkeypatch.setattr(subprocess, "Popen", popen_then_hangup)
    previous = signal.signal(signal.SIGHUP, hangup)
    try:
        with pytest.raises(_Hangup):
            start_in_own_group([sys.executable, "-c", "import time; time.sleep(600)"])
    finally:
        signal.signal(signal.SIGHUP, previous)
    (proc,) = started
    assert proc.returncode is not None  # stopped and reaped before the exception went on
