"""Image requests in Dagster: `image_request_job`."""
