"""The file pipeline in Dagster: `process_file_job`, its ops, the watch sensor, recovery."""
