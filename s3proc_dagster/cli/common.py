"""What several `s3proc` commands share: the file argument's wording, the Dagster instance
a run started here goes to, the run request a sensor would make, the manual retry's reset.
Which zone a file belongs to, and its settings, is `zones.py`.

One definition each, so that `process` and `backfill` start the same run for a file, and
`retry` and `backfill --status failed` reset a FAILED file the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.files import parking
from s3proc_dagster.models import FileStatus
from s3proc_dagster.stores.base import ProgressStore

if TYPE_CHECKING:
    import dagster as dg

    from s3proc_dagster.cli.zones import Zones


FILE_ARGUMENT = (
    "a path (absolute, relative to the current directory, or relative to WATCH_PATH or to its "
    "landing zone's source as run tags show it), a path in the error directory (a zone's files "
    "wait in ERROR_DIRECTORY/<zone>), an s3:// URI, <archive>!/<entry path> for a file inside an "
    "archive, or a fileId"
)


def dagster_home() -> Path:
    """DAGSTER_HOME, or the checkout's `.dagster_home` where `scripts/dev` writes the instance."""
    return Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home")


def get_instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME; without one, the checkout's `.dagster_home` (written
    as `scripts/dev` writes it), so the runs show in the same UI."""
    import dagster as dg

    from s3proc_dagster.runs.instance import write_instance

    if not os.environ.get("DAGSTER_HOME"):
        home = dagster_home()
        if not (home / "dagster.yaml").exists():
            write_instance(home, int(os.environ.get("MAX_CONCURRENCY", "4")))
        os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def request_for(raw: str, zones: Zones) -> dg.RunRequest:
    """The RunRequest the watch, S3 or zone sensor would make for this file: same config,
    same tags (the file's metadata, `dagster/priority`, a declared zone's name and
    settings), so a run started here is one of theirs.

    The file belongs to the zone whose source holds it, and is located against that
    zone's source by the run's own rule (`sources.resolve.locate`: a link is never
    resolved), so it gets the zone's destination, rules and file id. A name the run will
    refuse, or an object whose metadata cannot be read, still gets its run, which records
    the file FAILED with the reason."""
    from s3proc_dagster.errors import UnsafeSourceError
    from s3proc_dagster.runs.requests import run_request_for
    from s3proc_dagster.sources.resolve import locate
    from s3proc_dagster.sources.s3_incoming import metadata_from_object

    zone = zones.of_argument(raw)
    cfg = zone.cfg
    try:
        source = locate(raw, cfg.monitoring.watch_path, cfg.s3.incoming_prefix)
    except UnsafeSourceError:
        named = raw if "://" in raw else os.path.abspath(raw)
        return run_request_for(named, "", run_key="", metadata={}, zone=zone.settings)
    metadata = None
    if source.is_object:
        from s3proc_dagster.transfer.client import client_for
        from s3proc_dagster.transfer.verify import head

        try:
            found = head(client_for(cfg.s3), source.bucket or "", source.key or "") or {}
        except S3ProcError:
            found = {}
        metadata = metadata_from_object(found.get("Metadata", {}))
    return run_request_for(
        source.uri, source.relative_path, run_key="", metadata=metadata, roots=source.roots, zone=zone.settings
    )


def back_to_pending(store: ProgressStore, status: FileStatus, watch: Path, error_dir: Path) -> None:
    """The manual retry's two moves: a local original comes back from the error directory
    (unless a file is at its path again: that one is run, the parked copy left alone), and
    the record goes back to PENDING. `retry` and `backfill --status failed` both use it."""
    if "://" not in status.file_path and not Path(status.file_path).exists():
        parking.unpark(Path(status.file_path), watch, error_dir)
    store.reset_to_pending(status.file_id, None)
