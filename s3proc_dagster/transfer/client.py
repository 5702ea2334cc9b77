"""One way to make the boto3 S3 client, for the Dagster resource and the command line alike."""

from __future__ import annotations

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
    import boto3  # 0.3 s of import, paid only by what talks to S3

    return boto3.session.Session().client(
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
