"""A throwaway deployment's parts, shared by the benchmarks and the test suite.

An S3 endpoint and the settings a product process needs to reach it, a complete product
environment in a directory, the deployment they make, and the means to look into it (S3
listings, the objects a committed dataset consists of) and to feed it (promotions CSVs
shaped like the seeds'). The test suite's fixtures (its `conftest.py`) build
theirs from these, and so does `soak.py`, so a soak runs the product exactly as the tests
set it up. Nothing here starts a server: that is `s3proc_dagster.cli.embedded`'s.
"""

from __future__ import annotations

import csv
import io
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from s3proc_dagster.cli.embedded import Server

if TYPE_CHECKING:
    from benchmarks.s3_proxy import FaultyS3Proxy


# ---- the endpoint and the environment ---------------------------------------------------------


@dataclass
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    bucket: str
    server: Server | None = None

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def env(self) -> dict[str, str]:
        """The settings a pipeline process needs to talk to this endpoint."""
        return {
            "S3_ENDPOINT": self.url,
            "S3_ACCESS_KEY_ID": self.access_key,
            "S3_SECRET_ACCESS_KEY": self.secret_key,
            "S3_BUCKET": self.bucket,
            "S3_REGION": "us-east-1",
            "S3_FORCE_PATH_STYLE": "true",
        }


def product_env(root: Path, s3: S3Endpoint, prefix: str) -> dict[str, str]:
    """A complete, valid environment for the product with its directories under `root`."""
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    return {
        **s3.env(),
        "S3_PREFIX": prefix,
        "WATCH_PATH": str(root / "incoming"),
        "ERROR_DIRECTORY": str(root / "errors"),
        "STAGING_DIRECTORY": str(root / "staging"),
        "PROGRESS_DB_PATH": str(root / "progress.db"),
        "REPORTS_DB_PATH": str(root / "reports.duckdb"),
        "STABILITY_THRESHOLD_MS": "0",
        "MAX_RETRIES": "1",
        # A test that drops several files runs each file's request itself; batches under a
        # backlog are test_batching.py's, which turns them on for its ticks.
        "BATCH_FILES": "false",
        "RETRY_DELAY_MS": "10",
        "LOG_PRETTY": "false",
        "MONGODB_URI": "",
    }


# ---- the deployment --------------------------------------------------------------------------


@dataclass
class Deployment:
    """One running deployment: settings, directories, store and instance, and the proxy
    its S3 traffic goes through.

    The code location reads its settings once, at import, as in production; so the
    pipeline tests share one (the `deployment` fixture) and keep apart by sub-directory of
    the watch path, and the soak makes one of its own.
    """

    root: Path
    env: dict[str, str]
    s3: S3Endpoint
    proxy: FaultyS3Proxy

    @property
    def watch(self) -> Path:
        return Path(self.env["WATCH_PATH"])

    @property
    def errors(self) -> Path:
        return Path(self.env["ERROR_DIRECTORY"])

    @property
    def prefix(self) -> str:
        return self.env["S3_PREFIX"]

    def store(self):
        from s3proc_dagster.stores.sqlite import SQLiteProgressStore

        return SQLiteProgressStore(self.env["PROGRESS_DB_PATH"])

    def instance(self):
        import dagster as dg

        return dg.DagsterInstance.get()


# ---- looking into S3 ---------------------------------------------------------------------------


def list_keys(deployment: Deployment, prefix: str) -> list[str]:
    client = deployment.s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=deployment.s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def open_uploads(deployment: Deployment, prefix: str) -> list[dict]:
    client = deployment.s3.client()
    pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=deployment.s3.bucket, Prefix=prefix)
    return [u for page in pages for u in page.get("Uploads", [])]


def dataset_keys(dataset_key: str, sha: str, chunks: int) -> list[str]:
    """Every object a committed dataset consists of, sorted as S3 lists them: its manifest,
    its symlink manifest and the parts of the version whose SHA-256 is `sha`."""
    from s3proc_dagster.transfer.manifest import part_key

    parts = [part_key(dataset_key, sha, i) for i in range(chunks)]
    return [f"{dataset_key}/_manifest.json", f"{dataset_key}/_symlink_format_manifest/manifest", *parts]


# ---- promotions data, shaped like the seeds' -----------------------------------------------------


def promo_rows(n: int, seed: int = 7) -> list[list[str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user = "".join(rng.choices(string.ascii_lowercase + string.digits, k=10))
        code = "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))
        rows.append(
            [
                f"u-{user}",
                code,
                f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                f"{rng.uniform(1, 500):.2f}",
                str(i),
            ]
        )
    return rows


HEADER = ["userId", "promoCode", "offerExpiry", "amount", "seq"]


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out, delimiter=delimiter)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def csv_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(HEADER)
    writer.writerows(rows)
    return out.getvalue().encode()


# ---- waiting -------------------------------------------------------------------------------------


def wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval, bounded by the deadline
