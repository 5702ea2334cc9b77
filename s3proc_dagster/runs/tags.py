"""The tags every run of a file carries, however it was started: what the UI filters by."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from s3proc_dagster.models import ARCHIVE_FILE_ID, FileStatus, make_file_id
from s3proc_dagster.names import EXTENSION_TAG, FILE_ID_TAG, FILE_TAG, PATH_TAG, SOURCE_TAG
from s3proc_dagster.sources.metadata import run_tags
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR, path_below
from s3proc_dagster.sources.resolve import relative_key
from s3proc_dagster.transfer.keys import split_uri


def file_tag(relative_path: str, file_id: str) -> dict[str, str]:
    """The one tag that finds every run of a file, its own or a batch's: a batch run holds
    one per file (a run tag has one value, so the path is in the key), and a single
    file's run the same, so one filter finds both (`s3proc/file/nyc/flights.csv`)."""
    return {f"{FILE_TAG}/{relative_path}": file_id}


def recorded_file_tag(record: FileStatus, watch: Path, error_dir: Path, incoming_prefix: str) -> dict[str, str]:
    """The `file_tag` on the runs that processed a recorded file, from its record alone.

    Its relative path is the runs': below WATCH_PATH (or below ERROR_DIRECTORY for a file
    named there), the key below S3_INCOMING_PREFIX for an object, the name alone for a
    file from elsewhere. An archive entry is processed by its archive's runs, so it has
    the archive's tag.
    """
    source, in_archive, _ = record.file_path.partition(ENTRY_SEPARATOR)
    if "://" in source:
        rel = relative_key(split_uri(source)[1], incoming_prefix)
    else:
        rel = path_below(source, watch) or path_below(source, error_dir) or PurePosixPath(source).name
    file_id = (record.metadata.get(ARCHIVE_FILE_ID) or make_file_id(rel)) if in_archive else record.file_id
    return file_tag(rel, file_id)


def file_run_tags(
    relative_path: str, source: str, file_id: str, metadata: dict[str, Any] | None = None
) -> dict[str, str]:
    """A sensor puts these on the runs it requests; a run started another way (`dagster
    job launch`, the Launchpad) gets them from its first step, so all runs look alike.
    The file's metadata comes first and in its own namespace: the product's tags, which
    say which file the run is for, are never the producer's to set."""
    return {
        **run_tags(metadata or {}),
        PATH_TAG: relative_path,
        SOURCE_TAG: source,
        FILE_ID_TAG: file_id,
        EXTENSION_TAG: PurePosixPath(relative_path).suffix.lower().lstrip(".") or "none",
        **file_tag(relative_path, file_id),
    }
