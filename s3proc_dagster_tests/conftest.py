"""Real servers on loopback, started once per test session.

SeaweedFS (S3), nx-27017 (MongoDB wire protocol) and PostgreSQL (Dagster's production
storage; Debian's server, started only when a test asks for it) start in about a second
each. A server that fails to start fails the fixture with its log; nothing is skipped
silently. Set MONGODB_URI to run the MongoDB contract tests against a real server instead.

nx-27017 (0.8.1) answers `hello` as a standalone (no `setName`) and has no flag to do
otherwise, though it runs transactions; `mongodb_replset_uri` puts it behind
`ReplicaSetFace`, which adds a one-member replica set to its `hello` replies and passes
every other byte through, so the store's transaction path runs against it.

Every server stops through `embedded.stop_process_group` (a deadline, then SIGKILL of
its process group), and the session fails if any process it started is still running
at the end (`s3proc_dagster.cli.leftovers`), so a leak shows up as a red run, not as a
busy port later. Every test that uses a server is marked `servers`, by the fixtures it
uses (`pytest_collection_modifyitems`): `-m "not servers"` is the fast loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bson
import pytest

from benchmarks.support import Deployment, S3Endpoint, product_env
from s3proc_dagster.cli.dev import wait_for_ui
from s3proc_dagster.cli.embedded import PostgresServer, start_nx27017, start_postgres, start_seaweedfs
from s3proc_dagster.cli.leftovers import SESSION_ENV, describe, find_leftovers, kill
from s3proc_dagster.cli.processes import ServerStartError, free_port, start_in_own_group, stop_process_group
from s3proc_dagster_tests.pipeline_helpers import COMMAND_DIR

ACCESS_KEY = "s3proc-test-key"
SECRET_KEY = "s3proc-test-secret-do-not-log"
BUCKET = "s3proc-test"
ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Mark every process this session starts (`.ci/run` may already have), so the check
    at the end finds our leftovers even once they are re-parented, and only ours; and
    check that no test gets a server unmarked (`ServerMarkCheck`)."""
    os.environ.setdefault(SESSION_ENV, f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    config.pluginmanager.register(ServerMarkCheck(), "s3proc-server-mark-check")


#: The fixtures that start a server: a process (SeaweedFS, nx-27017, PostgreSQL, `dagster
#: dev`) or a socket listening on loopback (the deployment's S3 proxy, the replica-set
#: relay). A test module adds its own as a module-level `SERVER_FIXTURES` (test_images.py).
#: Whatever is built on one of them needs no entry: `item.fixturenames` is the closure of
#: what a test uses, so `pipeline_env` (on `s3`) or `landed` (on `deployment`) is caught.
SERVER_FIXTURES = frozenset(
    {
        "s3",
        "deployment",
        "mongodb_uri",
        "mongodb_replset_uri",
        "postgres",
        "dagster_dev",
        "instance_storage",
    }
)


def server_fixtures(item: pytest.Item) -> frozenset[str]:
    """Ours and those of the item's module."""
    module = getattr(item, "module", None)
    return SERVER_FIXTURES | frozenset(getattr(module, "SERVER_FIXTURES", ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`servers` on every test that uses a server fixture, so `-m "not servers"` is the fast
    loop. A fixture that asks for a server at run time (`request.getfixturevalue`, as the
    stores' `backend` does for MongoDB) is not in the closure: the params that do so carry
    the mark themselves (`pytest.param(..., marks=pytest.mark.servers)`), and
    `ServerMarkCheck` fails a test that gets a server without it."""
    for item in items:
        if server_fixtures(item) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


class ServerMarkCheck:
    """Fails a test whose setup starts a server fixture while it lacks the `servers` mark: a
    hole in the fast loop. Under `-m "not servers"` no marked test has started the session's
    servers before, so every such test is caught there.

    A plugin of its own, not hooks of this conftest: those see only nodes under this
    directory, and a session-scoped fixture (`s3`, `mongodb_uri`) is set up for the session."""

    def __init__(self) -> None:
        self.running: pytest.Item | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.running = item

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> None:
        item = self.running
        if item is None or fixturedef.argname not in server_fixtures(item):
            return
        if item.get_closest_marker("servers") is None:
            pytest.fail(
                f"{item.nodeid} starts a server ({fixturedef.argname}) but is not marked `servers`: "
                "mark the param or the test that asks for it at run time",
                pytrace=False,
            )


@pytest.hookimpl(trylast=True)  # after pytest-xdist has stopped its workers
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when a process it started outlives it (servers are stopped by the
    fixtures' teardown, which has run by now), list them, and kill them by pid.

    Under pytest-xdist only the controller looks, once every worker has ended: a worker
    carries the session's marker too, and one finishing first would take the other for a
    leftover."""
    if hasattr(session.config, "workerinput"):
        return
    leftovers = find_leftovers(os.environ[SESSION_ENV])
    if not leftovers:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    title = f"{len(leftovers)} process(es) started by this session are still running"
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", title, red=True)
    else:
        print(title, file=sys.stderr)
    for proc in leftovers:
        if reporter is not None:
            reporter.write_line(f"  {describe(proc)}", red=True)
        else:
            print(f"  {describe(proc)}", file=sys.stderr)
    kill(leftovers)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """SeaweedFS for the whole session; tests keep apart by `s3_prefix`."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), ACCESS_KEY, SECRET_KEY, BUCKET)
    yield S3Endpoint(server.url, ACCESS_KEY, SECRET_KEY, BUCKET, server)
    server.stop()


@pytest.fixture
def s3_prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's objects."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def world_readable_umask() -> Iterator[None]:
    """The usual umask (022) for one test, whatever the suite was started with: a file the
    product creates without a mode of its own then comes out 0644, so a test of file modes
    fails where the product forgot one."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MONGODB_URI when set (a real MongoDB), otherwise nx-27017 on a free port."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    server = start_nx27017(tmp_path_factory.mktemp("nx27017"))
    yield server.url
    server.stop()


class ReplicaSetFace:
    """A loopback TCP relay to a MongoDB wire-protocol server that presents it as the
    primary of a one-member replica set named `set_name`.

    Only `hello`/`isMaster` replies change (OP_MSG and the legacy OP_REPLY of the
    handshake): `setName`, `hosts`, `primary` and `me` name the relay's own address, as
    a real member's do. Requests and every other reply pass through untouched.
    """

    HELLO_KEYS = ("isWritablePrimary", "ismaster")

    def __init__(self, upstream_port: int, set_name: str = "rs0") -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.set_name = set_name
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, name="replset-face", daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"mongodb://{self.address}/"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed by stop()
                return
            server = socket.create_connection(self.upstream)
            pumps = [
                threading.Thread(target=self._pump, args=(client, server, False), daemon=True),
                threading.Thread(target=self._pump, args=(server, client, True), daemon=True),
            ]
            with self._lock:
                self._sockets += [client, server]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while True:
                header = _read_exactly(source, 16)
                if header is None:
                    break
                (length,) = struct.unpack("<i", header[:4])
                body = _read_exactly(source, length - 16)
                if body is None:
                    break
                message = header + body
                sink.sendall(self._rewrite(message) if replies else message)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _rewrite(self, message: bytes) -> bytes:
        request_id, response_to, opcode = struct.unpack("<iii", message[4:16])
        if opcode == 2013:  # OP_MSG: flags, then a kind-0 body section first
            flags = struct.unpack("<I", message[16:20])[0]
            if message[20] != 0:
                return message
            (size,) = struct.unpack("<i", message[21:25])
            doc = bson.decode(message[21 : 21 + size])
            if not any(k in doc for k in self.HELLO_KEYS):
                return message
            end = len(message) - (4 if flags & 1 else 0)
            payload = (
                struct.pack("<I", flags & ~1) + b"\x00" + bson.encode(self._as_member(doc)) + message[21 + size : end]
            )
        elif opcode == 1:  # OP_REPLY to the legacy handshake: one document
            (size,) = struct.unpack("<i", message[36:40])
            doc = bson.decode(message[36 : 36 + size])
            if not any(k in doc for k in self.HELLO_KEYS):
                return message
            payload = message[16:36] + bson.encode(self._as_member(doc)) + message[36 + size :]
        else:
            return message
        return struct.pack("<iiii", 16 + len(payload), request_id, response_to, opcode) + payload

    def _as_member(self, doc: dict) -> dict:
        return {
            **doc,
            "setName": self.set_name,
            "setVersion": 1,
            "hosts": [self.address],
            "primary": self.address,
            "me": self.address,
            "secondary": False,
        }

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self._listener.close()
        self._accepting.join(timeout=10)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(timeout=10)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


@pytest.fixture(scope="session")
def mongodb_replset_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nx-27017 presented as a one-member replica set (see `ReplicaSetFace`): the
    store detects transactions there and takes its transaction path."""
    server = start_nx27017(tmp_path_factory.mktemp("nx27017-replset"))
    face = ReplicaSetFace(int(server.url.rsplit(":", 1)[1].strip("/")))
    try:
        yield face.url
    finally:
        face.stop()
        server.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """PostgreSQL for the session (a fresh cluster, trust auth on loopback); tests keep apart
    by database. When it cannot start, the fixture raises with initdb's output or the
    server's log: the PostgreSQL tests fail, they are never skipped."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


@pytest.fixture
def mongodb_database() -> str:
    return f"s3proc_test_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pipeline_env(tmp_path: Path, s3: S3Endpoint, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`product_env` in `tmp_path`, applied to os.environ for one test."""
    env = product_env(tmp_path, s3, s3_prefix)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return env


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory, s3: S3Endpoint) -> Iterator[Deployment]:
    from benchmarks.s3_proxy import FaultyS3Proxy
    from s3proc_dagster.runs.instance import write_instance

    root = tmp_path_factory.mktemp("deployment")
    proxy = FaultyS3Proxy(s3.url)  # the pipeline reaches SeaweedFS through it
    env = {
        **product_env(root, s3, "deploy"),
        "S3_ENDPOINT": proxy.url,
        "CHUNK_SIZE": "50000",
        "VALIDATION_AS_OF": "2026-01-01",
        "S3_INCOMING_PREFIX": "incoming",
        "REPORTS_AUTO_REFRESH": "false",
        "IMAGE_ALLOW_PRIVATE_URLS": "true",  # the tests' image server listens on loopback
        "DAGSTER_HOME": str(root / "dagster_home"),
    }
    write_instance(Path(env["DAGSTER_HOME"]), max_concurrency=2)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield Deployment(root, env, s3, proxy)
    proxy.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def dagster_dev(deployment: Deployment, tmp_path: Path) -> Iterator[str]:
    """`dagster dev` (webserver, daemon, code server) on the deployment's instance; its URL."""
    port = free_port()
    log = (tmp_path / "dagster-dev.log").open("w")
    # IGNORE_INITIAL: its watch sensor leaves alone the files already there when it starts,
    # which the tests run themselves.
    proc = start_in_own_group(
        [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-w",
            str(ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=COMMAND_DIR,  # no developer's .env: Dagster would load it over this environment
        env={**os.environ, "IGNORE_INITIAL": "true", "S3_INCOMING_PREFIX": ""},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        try:  # as `s3proc dev` waits: about 5 s here when idle, 90 s and more when busy
            wait_for_ui(proc, "127.0.0.1", port)
        except ServerStartError as error:
            pytest.fail(f"{error}\n{(tmp_path / 'dagster-dev.log').read_text()[-3000:]}", pytrace=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        # SIGINT to its group, as Ctrl-C: dagster dev, webserver, daemon and code server
        stop_process_group(proc, deadline_s=20, sig=signal.SIGINT)
        log.close()


@dataclass
class InstanceStorage:
    """The storage of the Dagster instance one test runs on, and a look into it that does
    not go through Dagster."""

    kind: str  # "sqlite" or "postgres"
    home: Path
    database_url: str | None = None  # the PostgreSQL database, as libpq reads it

    def run_ids(self) -> set[str]:
        """The ids in the storage's `runs` table, read with the database's own client: a
        run the instance reports is checked to be where the dagster.yaml says it is."""
        if self.database_url:
            import psycopg2

            connection = psycopg2.connect(self.database_url, connect_timeout=5)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT run_id FROM runs")
                    return {row[0] for row in cursor.fetchall()}
            finally:
                connection.close()
        import sqlite3

        connection = sqlite3.connect(self.home / "storage" / "history" / "runs.db")
        try:
            return {row[0] for row in connection.execute("SELECT run_id FROM runs")}
        finally:
            connection.close()


@pytest.fixture(params=["sqlite", "postgres"])
def instance_storage(
    request: pytest.FixtureRequest, deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> InstanceStorage:
    """Runs the test twice, on a fresh Dagster instance each time: one on SQLite, as on one
    machine, and one on PostgreSQL (a database of its own on the session's server), as in
    production. The instance is written by `write_instance`, which picks PostgreSQL because
    DAGSTER_POSTGRES_URL is set; DAGSTER_HOME points at it for the test, so the test's own
    calls, `dagster dev`, the daemon, `dagster job launch` and `s3proc` all use it."""
    import dagster as dg

    from s3proc_dagster.runs.instance import POSTGRES_URL_ENV, prepare_storage, write_instance

    home = tmp_path / f"dagster_home_{request.param}"
    database_url = None
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres")
        name = f"dagster_{uuid.uuid4().hex[:10]}"
        database_url = server.create_database(name)
        monkeypatch.setenv(POSTGRES_URL_ENV, server.database_url(name, driver="psycopg2"))
        monkeypatch.setitem(deployment.env, POSTGRES_URL_ENV, os.environ[POSTGRES_URL_ENV])
    else:
        monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    write_instance(home, max_concurrency=2)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setitem(deployment.env, "DAGSTER_HOME", str(home))
    prepare_storage(home)  # the tables and the upload pool's row, as `s3proc dev` makes them
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs_count() == 0
    return InstanceStorage(request.param, home, database_url)
