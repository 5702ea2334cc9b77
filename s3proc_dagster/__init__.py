"""s3proc_dagster: files from where they land to S3, converted, chunked, verified and tracked."""

__version__ = "0.1.0"
