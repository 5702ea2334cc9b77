"""One fetch's overall deadline, kept at the socket.

requests' timeouts bound each socket operation, and every byte that arrives re-arms the read
timeout: a server sending one byte every half second held a fetch with 1 s timeouts for 8 s
and longer, in the status line, the headers or the body alike. A check between body blocks
is not enough either, because one 64 KiB block is many recvs inside urllib3 and http.client,
out of the caller's reach. So every socket the fetch opens is registered here, and a timer
shuts them all down when the time is up: the read blocked at that moment returns at once,
whatever layer it is in (headers, a TLS record, the body), and the fetch reports the
deadline instead of the "connection closed" that follows. Connects are bounded the usual
way, by a connect timeout no longer than the time left.

Not bounded: name resolution (`getaddrinfo` cannot be interrupted; the system resolver's
own timeouts apply), and connections requests makes to a proxy, which only
IMAGE_ALLOW_PRIVATE_URLS allows (the deadline is still checked between blocks there).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from s3proc_dagster.images.egress import Connector


class Deadline:
    """`seconds` from now, for one fetch; use as a context manager around the fetch."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._at = clock() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.cut = False  # the timer shut the sockets down: whatever was read since is incomplete

    def remaining(self) -> float:
        return max(0.0, self._at - self._clock())

    @property
    def expired(self) -> bool:
        return self.cut or self.remaining() <= 0

    def bound(self, timeout: tuple[float, float]) -> tuple[float, float]:
        """(connect, read) timeouts, neither longer than the time left."""
        left = self.remaining()
        return (min(timeout[0], left), min(timeout[1], left))

    def connector(self, connect: Connector) -> Connector:
        """`connect`, with its timeout cut to the time left and the socket it makes watched."""

        def connect_within(address: tuple[str, int], timeout: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
            left = self.remaining()
            if left <= 0:
                raise TimeoutError("overall deadline passed before connecting")
            timeout = min(timeout, left) if isinstance(timeout, int | float) else left
            sock = connect(address, timeout, *args, **kwargs)
            self.watch(sock)
            return sock

        return connect_within

    def watch(self, sock: socket.socket) -> None:
        """Keep a duplicate of `sock`: shutting the duplicate down ends the connection even
        after TLS has wrapped (and detached) the original socket object."""
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self.cut:
                _shut(duplicate)

    def _cut_all(self) -> None:
        with self._lock:
            self.cut = True
            for sock in self._sockets:
                _shut(sock)

    def __enter__(self) -> Deadline:
        self._timer = threading.Timer(self.remaining(), self._cut_all)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its owner: nothing left to stop
        sock.shutdown(socket.SHUT_RDWR)
