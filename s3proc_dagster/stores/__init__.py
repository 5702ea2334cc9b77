"""Progress stores: one contract (`base.ProgressStore`), SQLite and MongoDB backends."""

from __future__ import annotations

from s3proc_dagster.settings import ProcessingConfig
from s3proc_dagster.stores.base import ProgressStore


def open_store(processing: ProcessingConfig) -> ProgressStore:
    """MongoDB when `MONGODB_URI` is set, otherwise SQLite at `PROGRESS_DB_PATH`."""
    if processing.uses_mongodb:
        from s3proc_dagster.stores.mongo import MongoProgressStore

        return MongoProgressStore(processing.mongodb_uri.get_secret_value(), processing.mongodb_database)
    from s3proc_dagster.stores.sqlite import SQLiteProgressStore

    return SQLiteProgressStore(processing.progress_db_path)


__all__ = ["ProgressStore", "open_store"]
