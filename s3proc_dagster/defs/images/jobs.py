"""`image_request_job`: validate the product CSV, fan out one step per row, finalize the request."""

import dagster as dg

from s3proc_dagster.defs.images.ops import finalize_request, process_image_row, validate_request


@dg.job(
    name="image_request_job",
    description="Compress every image listed in a product CSV and record the output URLs.",
    tags={"s3proc/job": "images"},
)
def image_request_job() -> None:
    rows = validate_request().map(process_image_row)
    finalize_request(rows.collect())
