"""The names Dagster, the UI and the command line know the product's objects by: jobs, the
ops a run config names, pools and run tags. Written once, here; everything else imports them.
"""

from s3proc_dagster.models import ProcessingStep

# ---- jobs --------------------------------------------------------------------------------------
PROCESS_FILE_JOB = "process_file_job"  # one file, one op per ProcessingStep
PROCESS_FILES_JOB = "process_files_job"  # several small files in one run, under a backlog (runs/batching.py)
IMAGE_REQUEST_JOB = "image_request_job"
RECONCILE_JOB = "reconcile_job"  # crash recovery
REPORTS_JOB = "reports_job"
FILE_JOBS = (PROCESS_FILE_JOB, PROCESS_FILES_JOB)
ASSET_JOB = "__ASSET_JOB"  # Dagster's own job for assets materialized from the catalog

# ---- assets --------------------------------------------------------------------------------------
ZONES_KEY = "zones"  # a declared zone's asset: zones/<name>, one partition per file
PARTITION_TAG = "dagster/partition"  # Dagster's: the partition a run materializes

# ---- ops a run config names ------------------------------------------------------------------
CHECKSUM_OP = ProcessingStep.CHECKSUM_CALCULATION.value  # the file jobs' config: the file, or a batch's files
VALIDATE_REQUEST_OP = "validate_request"  # image_request_job's config: the CSV or the request

# ---- pools ---------------------------------------------------------------------------------------
UPLOAD_POOL = "s3_uploads"  # the upload step's pool: how many uploads run at once, whatever the runs

# ---- run tags --------------------------------------------------------------------------------------
TAG = "s3proc"
PATH_TAG = f"{TAG}/path"  # the file's path below WATCH_PATH or the incoming prefix
SOURCE_TAG = f"{TAG}/source"  # where it is: an absolute path or s3:// URI
FILE_ID_TAG = f"{TAG}/file_id"  # one run per file at a time (the run queue's tag limit)
EXTENSION_TAG = f"{TAG}/extension"
SHA256_TAG = f"{TAG}/sha256"
FILE_TYPE_TAG = f"{TAG}/file_type"
FILE_TAG = f"{TAG}/file"  # s3proc/file/<relative path> = <fileId>: every run that processed the file
BATCH_TAG = f"{TAG}/batch"  # how many files a batch run holds
ARRIVAL_TAG = f"{TAG}/arrival"  # s3proc/arrival/<digest of an object's run key>: a batch run holds one per object
HAS_FAILURES_TAG = f"{TAG}/has_failures"  # "true" on a batch run that gave up a file: it still succeeds
JOB_TAG = f"{TAG}/job"  # files | images | recovery: which family a job belongs to
KIND_TAG = f"{TAG}/kind"  # image_request | recovery; on materializations: file | chunk | object
DEAD_TAG = f"{TAG}/dead"  # how many dead runs and claims a recovery run settles
BACKFILL_TAG = f"{TAG}/backfill"
RETRY_TAG = f"{TAG}/retry"  # a file set back to PENDING after it started: runs again, alone
REQUEST_ID_TAG = f"{TAG}/request_id"
ZONE_TAG = f"{TAG}/zone"  # the declared landing zone a run's files came from
DEFAULT_PRIORITY_TAG = "dagster/priority"  # a zone's priority; a file's own `priority` metadata wins
META_TAG = f"{TAG}.meta"  # s3proc.meta/<key>: a file's metadata, apart from the product's own tags
