"""Seed 002 in Dagster: `image_request_job`."""
