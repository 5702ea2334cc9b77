"""`image_request_job`: validate the product CSV, fan out one step per row, finalize the request.

`settle_failed_request` hooks every step: when one fails, the request is settled FAILED
there and then, because no step after it will (finalize_request waits for every row).
"""

import dagster as dg

from s3proc_dagster.defs.images.ops import finalize_request, process_image_row, settle_failed_request, validate_request
from s3proc_dagster.names import IMAGE_REQUEST_JOB, JOB_TAG


@dg.job(
    name=IMAGE_REQUEST_JOB,
    description="Compress every image listed in a product CSV and record the output URLs.",
    hooks={settle_failed_request},
    tags={JOB_TAG: "images"},
)
def image_request_job() -> None:
    rows = validate_request().map(process_image_row)
    finalize_request(rows.collect())
