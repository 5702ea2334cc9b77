"""Processes the command line starts and must stop for sure: servers in sessions of their
own, stopped with their whole process group within a deadline; free and taken ports; and
work done in a fresh process apart, whose imports the long-lived caller must not keep.

Used by `s3proc dev` (SeaweedFS and the Dagster services, `embedded.py`, `services.py`)
and by the test fixtures and benchmarks, which start and stop their servers the same way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import psutil

from s3proc_dagster.errors import S3ProcError

#: SeaweedFS opens each service's gRPC port at its HTTP port + this offset.
GRPC_PORT_OFFSET = 10000


class ServerStartError(S3ProcError, RuntimeError):
    """A server did not come up, or cannot: its port is taken, it exited, it never answered."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could not listen on `host:port` right now.

    The probe sets SO_REUSEADDR as servers do (uvicorn, Go's net.Listen), so a port held
    only by TIME_WAIT connections of a server that just stopped counts as free, while a
    listening socket, or any socket bound without SO_REUSEADDR, counts as taken.
    """
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return True
        return False


def free_port(with_grpc: bool = False, avoid: Collection[int] = ()) -> int:
    """A free loopback port; with `with_grpc`, port + GRPC_PORT_OFFSET is free too (SeaweedFS's gRPC).

    `avoid`: ports promised to a server that has not bound them yet (the UI's, while the code
    server starts first): the kernel hands a free port out again, so it could hand out those.
    """
    avoid = set(avoid)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if ({port, port + GRPC_PORT_OFFSET} if with_grpc else {port}) & avoid:
            continue
        if not with_grpc:
            return port
        if port + GRPC_PORT_OFFSET < 65535 and not port_in_use(port + GRPC_PORT_OFFSET):
            return port
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        if {port, port + GRPC_PORT_OFFSET} & avoid:
            continue
        if not port_in_use(port) and not port_in_use(port + GRPC_PORT_OFFSET):
            return port
    raise ServerStartError("no free port pair found")


#: The signals that mean "stop": held back while a server is being started (see below).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def start_in_own_group(cmd: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Start a server in a session of its own, with SIGINT and SIGTERM at their default actions.

    Its own session makes it the leader of a process group that holds everything it
    starts (`dagster dev`'s webserver, daemon, code server and run workers all stay in
    it), so `stop_process_group` can signal, and at worst SIGKILL, the whole tree at once;
    and a terminal's Ctrl-C reaches only us, who forward it.

    SIGINT is reset because a process started with `&` by a non-interactive shell inherits
    it ignored, across exec: Python then installs no KeyboardInterrupt handler, Dagster
    copies that "ignore" onto SIGTERM, and its own shutdown pipe (which interrupts with
    SIGINT) stops working, so such a `dagster dev` can only be killed. In a session of its
    own nobody but us can send it SIGINT, so restoring the default is safe.

    While Popen forks and waits for exec, the stop signals are held back: a handler that
    raises there (Ctrl-C, the launcher's SIGTERM) would lose the Popen object and leave
    the child running with nobody to stop it. A signal held back is handled once Popen
    has returned, and then the new server is stopped before the exception goes on.
    (`preexec_fn` only resets a signal and the mask between fork and exec; no lock.)
    """
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def child_signals() -> None:
        # SIGTERM too: a process that imported Dagster with SIGINT ignored ignores SIGTERM
        # as well, and an ignored signal stays ignored across fork and exec.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)

    proc: subprocess.Popen | None = None
    try:
        proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=child_signals, **popen_kwargs)  # noqa: PLW1509 - see above
    finally:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held-back signal is handled here
        except BaseException:
            if proc is not None:
                stop_process_group(proc)
            raise
    return proc


def alive(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    """The ones still running; a zombie holds no port and waits only for its parent to reap it."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def _group_members(pgid: int | None) -> list[psutil.Process]:
    """Live processes in group `pgid`, including ones started after we looked at the tree."""
    if pgid is None:
        return []
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []  # the cheap answer for the common case: the group is gone
    except PermissionError:
        pass
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return alive(members)


def _kill(processes: Sequence[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def stop_process_group(proc: subprocess.Popen, deadline_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """Stop `proc` and everything it started, for sure, within about `deadline_s` seconds.

    `sig` goes once to `proc`'s process group (SIGINT for Dagster processes, as Ctrl-C
    sends it to a terminal's foreground group; SIGTERM for SeaweedFS and nx-27017), never
    twice to one process: Dagster turns a second SIGINT into a second KeyboardInterrupt
    that can cut its own shutdown short. Descendants in groups of their own (the
    launcher's servers) are left to `proc` to stop. Then we wait until `proc`, its group
    and every descendant it had when we looked are gone. Whatever is still alive at the
    deadline gets SIGKILL, with the whole process group of each survivor, because a
    server that ignores its signal (see `start_in_own_group`) or hangs in shutdown must
    not keep its port and its workers after we return.

    Our own process group is never signalled as a group: a `proc` that shares it (not
    started with `start_in_own_group`) is signalled alone. Returns `proc`'s exit code
    (negative: the signal that ended it).
    """
    own_group = os.getpgrp()
    pgid: int | None = proc.pid
    descendants: list[psutil.Process] = []
    if proc.returncode is None:  # not reaped yet, so the pid is still ours to look at
        try:
            pgid = os.getpgid(proc.pid)
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    if pgid != proc.pid or pgid == own_group:
        pgid = None  # proc does not lead a group of its own: never signal someone else's

    try:
        if pgid is not None:
            os.killpg(pgid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not alive(descendants) and not _group_members(pgid):
            return proc.returncode
        time.sleep(0.05)  # polling interval, bounded by the deadline

    if proc.poll() is None:  # also what it started since we first looked
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants += psutil.Process(proc.pid).children(recursive=True)
    survivors = list({p.pid: p for p in alive(descendants) + _group_members(pgid)}.values())
    groups = {pgid}
    for process in survivors:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(process.pid))
    for group in groups - {None, own_group}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    _kill(survivors)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    _wait_gone(survivors, 10.0)
    return proc.returncode


def _wait_gone(processes: Sequence[psutil.Process], timeout: float) -> None:
    """Until none is alive. Not `psutil.wait_procs`: an orphan nobody reaps (PID 1 does not
    on every machine) stays a zombie forever, and a zombie is as stopped as it gets."""
    deadline = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval, bounded by the deadline


def apart() -> ProcessPoolExecutor:
    """One worker in a fresh interpreter (spawn, not fork), for work whose imports (Dagster,
    boto3) a supervisor that runs for hours should not keep: use it in a `with`."""
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
