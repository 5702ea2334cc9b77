"""One way to make the boto3 S3 client, for the Dagster resource and the command line alike,
and pyarrow's S3 filesystem from the same settings for reading Parquet back."""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from botocore.config import Config

from s3proc_dagster.settings import S3Config

_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def make_client(
    endpoint: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    force_path_style: bool = True,
    max_attempts: int = 5,
    session_token: str | None = None,
) -> Any:
    """One client per process and configuration, made on first use.

    Making a boto3 client loads botocore's service models from JSON: 0.15-0.3 CPU-s each,
    and Dagster builds the S3 resource's client for every step and every hook, so a
    seven-step run made 13 of them (most of a small file's CPU). boto3's clients are
    thread-safe; the process id is part of the key, so a forked process never shares its
    parent's connections.
    """
    key = (
        os.getpid(),
        endpoint,
        region,
        access_key_id,
        secret_access_key,
        force_path_style,
        max_attempts,
        session_token,
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _new_client(*key[1:])
        return client


def _new_client(
    endpoint: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    force_path_style: bool,
    max_attempts: int,
    session_token: str | None,
) -> Any:
    """Path-style addressing for S3-compatible servers (SeaweedFS, MinIO), standard retries
    with backoff, and timeouts so that an unreachable S3 fails a step instead of hanging it."""
    return _session().client(
        "s3",
        region_name=region,
        endpoint_url=endpoint or None,
        aws_access_key_id=access_key_id or None,
        aws_secret_access_key=secret_access_key or None,
        aws_session_token=session_token or None,
        config=Config(
            s3={"addressing_style": "path" if force_path_style else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=60,
        ),
    )


def client_for(config: S3Config) -> Any:
    return make_client(
        config.endpoint,
        config.region,
        config.access_key_id.get_secret_value(),
        config.secret_access_key.get_secret_value(),
        config.force_path_style,
    )


def filesystem_for(config: S3Config) -> Any:
    """pyarrow's S3 filesystem on the same endpoint, credentials and addressing as `client_for`.

    Reading Parquet through it fetches byte ranges (the footer, then one row group at a
    time), so a part is never held whole in memory the way a boto3 GET would hold it.
    The timeouts are the boto3 client's, so an unreachable S3 fails instead of hanging.
    """
    from urllib.parse import urlparse

    from pyarrow import fs

    endpoint = urlparse(config.endpoint) if config.endpoint else None
    return fs.S3FileSystem(
        access_key=config.access_key_id.get_secret_value(),
        secret_key=config.secret_access_key.get_secret_value(),
        region=config.region,
        endpoint_override=endpoint.netloc if endpoint else None,
        scheme=endpoint.scheme if endpoint else "https",
        force_virtual_addressing=not config.force_path_style,
        connect_timeout=10,
        request_timeout=60,
    )


@functools.cache
def _session() -> Any:
    """One boto3 session per process, and so one botocore loader: the S3 service model and
    endpoint rules are parsed once, not for every client (17 MB and about 0.2 CPU-s each).
    The run zygote fills it before it forks (`warm_up`), so a run's client reuses those
    pages instead of making its own. A session holds no connection, so a forked process
    may share it; its clients are made under `_CLIENTS_LOCK`."""
    import boto3  # 0.3 s of import, paid only by what talks to S3

    return boto3.session.Session()


def warm_up() -> None:
    """Fill the session's caches with a client made as every other, never used (no
    connection is made)."""
    _new_client("http://127.0.0.1:9", "us-east-1", "warm-up", "warm-up", True, 5, None)
