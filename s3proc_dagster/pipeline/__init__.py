"""The steps of one file, as plain functions: the specification's ProcessingJob without an orchestrator.

One module per step or pair of steps, in the order a file goes through them:

    snapshot.py      1 checksum_calculation   the file into staging and its SHA-256, then the claim
    detection.py     2 type_detection         what the file is, by name and first bytes
                     3 archive_extraction     the file itself, or each entry of an archive
    conversion.py    4 parquet_conversion     tabular items into Parquet chunks, one pass each
    upload.py        5 S3 upload              every chunk and plain object, recorded as it lands
    verification.py  6 integrity_verification check and commit each dataset
                     7 progress_update        COMPLETED, with where the output lives
    failure.py       after the last retry     FAILED, uploads given up, the original parked

beside `records.py` (what the steps hand each other), `context.py` (what every step is
given: the store, the claim, the S3 client, the staging area) and `cache.py` (the staging
area as a cache that a step refills from the source).

Each step takes its `StepContext` and the previous step's record and returns the next
record. Every step reads the snapshot in the staging area, never the original, and is
safe to run again: a finished chunk is skipped, an existing conversion reused, an object
overwritten under the same key. Every step first makes sure its run still holds the file
version (`StepContext.hold`): one run at a time works on a file, a re-execution takes
over from its failed parent, and a run whose version was superseded stops instead of
overwriting it. Dagster's ops call the steps (`defs/files/ops.py`); benchmarks and tests
call them directly.
"""

from s3proc_dagster.pipeline.cache import staged_items, staged_snapshot, staging_root
from s3proc_dagster.pipeline.context import Claimant, StepContext
from s3proc_dagster.pipeline.conversion import convert_items
from s3proc_dagster.pipeline.detection import detect_type, plan_work
from s3proc_dagster.pipeline.failure import GaveUp, give_up
from s3proc_dagster.pipeline.records import ConversionRecipe, FileVersion, PreparedItem, UploadedObject, WorkItem
from s3proc_dagster.pipeline.snapshot import record_version, take_snapshot
from s3proc_dagster.pipeline.upload import UPLOAD_THREADS, landing, upload_items
from s3proc_dagster.pipeline.verification import finish, verify_items

__all__ = [
    "UPLOAD_THREADS",
    "Claimant",
    "ConversionRecipe",
    "FileVersion",
    "GaveUp",
    "PreparedItem",
    "StepContext",
    "UploadedObject",
    "WorkItem",
    "convert_items",
    "detect_type",
    "finish",
    "give_up",
    "landing",
    "plan_work",
    "record_version",
    "staged_items",
    "staged_snapshot",
    "staging_root",
    "take_snapshot",
    "upload_items",
    "verify_items",
]
