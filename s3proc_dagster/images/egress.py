"""Where an image fetch may connect: a public address, unless the operator allows private ones.

A product CSV is user input, so every URL in it is a server-side request forgery waiting to
happen: `http://169.254.169.254/latest/meta-data/` (cloud credentials),
`http://127.0.0.1:<port>/admin`, a database console on 10.x, or a harmless-looking public
URL that redirects to any of those. Reading the URL's text decides nothing (a name resolves
wherever its owner likes, and `http://2130706433/` is 127.0.0.1), and resolving the name to
check it, then letting the HTTP client resolve it again to connect, loses to DNS rebinding
(public answer for the check, 127.0.0.1 for the connect, TTL 0).

So the check sits where the socket is made. `GuardedAdapter` gives requests connections whose
`_new_conn` (the one place urllib3 resolves a host and connects) resolves the host once,
refuses it unless *every* address is public, and connects to one of those very addresses.
Everything above the socket still sees the hostname, so the Host header, TLS SNI and the
certificate check are the ones the URL asks for. Redirects are followed by the caller
(`fetch.py`), one request per hop, so every hop opens its connection here.

Why not a library: `advocate` (the requests-based one) requires urllib3 < 2;
`requests-hardened` pins its connection the same way but checks only the first address
getaddrinfo returns and reports only the IP, not why it was refused; newer packages
(`ssrfguard`, 2026) have no track record yet. The guard is ~100 lines on public urllib3
extension points (`PoolManager._new_pool`, `HTTPConnection._new_conn`), tested below the
fetch with a fake resolver and end to end against a real server.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter
from requests.utils import select_proxy
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
)
from urllib3.util.connection import allowed_gai_family, create_connection

from s3proc_dagster.errors import ImageRequestError

ALLOW_SETTING = "IMAGE_ALLOW_PRIVATE_URLS"
_ALLOW = f"set {ALLOW_SETTING}=true to allow private destinations"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressKind(Enum):
    """Why an address is not a public destination; the value reads in an error message."""

    UNSPECIFIED = "an unspecified address"
    LOOPBACK = "a loopback address"
    LINK_LOCAL = "a link-local address"
    PRIVATE = "a private address"
    SHARED = "a carrier-grade NAT (shared, 100.64.0.0/10) address"
    MULTICAST = "a multicast address"
    RESERVED = "a reserved (not globally routable) address"


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Checked in order, first match wins. The explicit table rather than `ip.is_private` alone:
# Python's answers move between releases (3.11.7 calls every IPv4-mapped address private and
# 100.64/10 neither private nor global), and the message should say which kind it is.
_KINDS: tuple[tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], AddressKind], ...] = (
    (_nets("0.0.0.0/8", "::/128"), AddressKind.UNSPECIFIED),  # Linux connects 0.0.0.0 to this host
    (_nets("127.0.0.0/8", "::1/128"), AddressKind.LOOPBACK),
    (_nets("169.254.0.0/16", "fe80::/10"), AddressKind.LINK_LOCAL),  # 169.254.169.254: cloud metadata
    (_nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10"), AddressKind.PRIVATE),
    (_nets("100.64.0.0/10"), AddressKind.SHARED),  # provider-internal, often routes to workloads
    (_nets("224.0.0.0/4", "ff00::/8"), AddressKind.MULTICAST),
    # IPv4-compatible (deprecated) and 6to4 addresses embed an IPv4 address a relay or a
    # tunnel may deliver anywhere; nothing legitimate serves product images from them.
    (_nets("::/96", "2002::/16"), AddressKind.RESERVED),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are IPv4


def classify_address(address: str | IPAddress) -> AddressKind | None:
    """What kind of non-public address this is, or None when it is a public destination.

    An IPv6 address that carries an IPv4 one (`::ffff:127.0.0.1`, NAT64 `64:ff9b::a00:1`) is
    judged by the IPv4 address, because that is where the packets go.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # drop a %scope: it does not change the kind
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for networks, kind in _KINDS:
        if any(ip in net for net in networks):  # a v4 address is in no v6 network and back
            return kind
    if not ip.is_global:  # documentation, benchmarking, 240/4, broadcast, 2001::/23, ...
        return AddressKind.RESERVED
    return None


class DestinationRefused(ImageRequestError):
    """An image URL (or a hop it redirects to) would connect to a private destination."""


Resolver = Callable[[str, int], Sequence[str]]
"""host, port -> every address the host resolves to, as strings."""
Connector = Callable[..., socket.socket]
"""urllib3's `create_connection((address, port), timeout, source_address=, socket_options=)`."""


def resolve_host(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives, in its order, for the families urllib3 would use."""
    infos = socket.getaddrinfo(host, port, family=allowed_gai_family(), type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class DestinationGuard:
    """Resolve once, refuse unless every address is public, connect to a vetted address.

    `resolve` and `connect` are the network; tests replace them to stand a public-looking
    name in front of a loopback server without touching the machine's DNS, and a fetch wraps
    `connect` to keep its deadline (`deadline.py`). `refuse_private=False`
    (IMAGE_ALLOW_PRIVATE_URLS) vets nothing, so that a fetch's connections are made here
    either way.
    """

    resolve: Resolver = resolve_host
    connect: Connector = create_connection
    refuse_private: bool = True

    def vet(self, host: str, port: int) -> list[str]:
        """The addresses `host` may be reached at; DestinationRefused names the first that may not.

        All of them must be public, not just the one we would try first: a name that answers
        both public and private addresses is one an attacker controls.
        """
        name = host.strip("[]")
        addresses = list(self.resolve(name, port))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{name} resolves to no address")
        if not self.refuse_private:
            return addresses
        for address in addresses:
            kind = classify_address(address)
            if kind is not None:
                where = f"{address} is" if address == name else f"{name} resolves to {address},"
                raise DestinationRefused(f"{where} {kind.value} ({_ALLOW})")
        return addresses

    def open_socket(
        self, host: str, port: int, timeout: Any, source_address: Any = None, socket_options: Any = None
    ) -> socket.socket:
        """A socket to the first vetted address that accepts, as create_connection does for a name."""
        error: OSError | None = None
        for address in self.vet(host, port):
            try:
                return self.connect(
                    (address, port), timeout, source_address=source_address, socket_options=socket_options
                )
            except OSError as exc:
                error = exc
        assert error is not None  # vet returned at least one address
        raise error


def _new_vetted_conn(conn: HTTPConnection, guard: DestinationGuard) -> socket.socket:
    """urllib3's `HTTPConnection._new_conn`, with the guard doing the resolving and connecting.

    The urllib3 errors are the same ones, so requests still reports ConnectionError or
    ConnectTimeout; DestinationRefused is not an OSError and passes through urllib3 and
    requests untouched, the pool closing the half-made connection on the way.
    """
    try:
        sock = guard.open_socket(conn._dns_host, conn.port, conn.timeout, conn.source_address, conn.socket_options)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    except TimeoutError as exc:
        raise ConnectTimeoutError(
            conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
        ) from exc
    except OSError as exc:
        raise NewConnectionError(conn, f"Failed to establish a new connection: {exc}") from exc
    sys.audit("http.client.connect", conn, conn.host, conn.port)
    return sock


class GuardedHTTPConnection(HTTPConnection):
    def __init__(self, *args: Any, guard: DestinationGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        return _new_vetted_conn(self, self._guard)


class GuardedHTTPSConnection(HTTPSConnection):
    def __init__(self, *args: Any, guard: DestinationGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_conn(self) -> socket.socket:
        return _new_vetted_conn(self, self._guard)


_GUARDED_CONNECTIONS = {"http": GuardedHTTPConnection, "https": GuardedHTTPSConnection}


class _GuardedPoolManager(PoolManager):
    """Every pool it makes builds guarded connections. The guard rides on the pool rather
    than in `connection_pool_kw`, whose keys urllib3 turns into a fixed pool-key tuple."""

    def __init__(self, *args: Any, guard: DestinationGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.ConnectionCls = functools.partial(_GUARDED_CONNECTIONS[scheme], guard=self._guard)  # type: ignore[assignment]
        return pool


class GuardedAdapter(HTTPAdapter):
    """A requests transport that connects only to vetted public addresses.

    Mount it for http:// and https:// on a session. A proxy is refused rather than used: the
    proxy would resolve the name itself, out of reach of the check. A guard that refuses
    nothing lets requests use the proxy, as it would without this adapter.
    """

    def __init__(self, guard: DestinationGuard | None = None, **kwargs: Any) -> None:
        self._guard = guard or DestinationGuard()  # set first: HTTPAdapter.__init__ builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **pool_kwargs: Any
    ) -> None:
        self._pool_connections = connections
        self._pool_maxsize = maxsize
        self._pool_block = block
        self.poolmanager = _GuardedPoolManager(
            num_pools=connections, maxsize=maxsize, block=block, guard=self._guard, **pool_kwargs
        )

    def send(
        self,
        request: Any,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> Any:
        proxy = select_proxy(request.url, proxies or {})
        if proxy and self._guard.refuse_private:
            raise DestinationRefused(
                f"a proxy ({proxy}) would resolve and reach the host itself, beyond the private-address "
                f"check; unset HTTP(S)_PROXY for image fetches, or {_ALLOW}"
            )
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
