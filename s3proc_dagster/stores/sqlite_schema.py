"""The SQLite progress store's tables, created or brought up to date when a store opens.

`file_progress` is the data model's table as written; the FileStatus and ChunkStatus
documents, the upload journal and the image requests each have tables of their own. A
file's record spans two tables: `file_progress` holds the columns the data model names
(its `s3_key` is where the output went), `file_status` the rest of the FileStatus
document (its `s3_bucket`/`s3_key` are the source object).
"""

from __future__ import annotations

import sqlite3

# Columns added after the first release: a store created by an older version gains them
# at open (ALTER TABLE ... ADD COLUMN is instant in SQLite), so upgrading keeps the data.
_ADDED_COLUMNS = {
    "file_status": {"run_id": "TEXT", "after_success": "TEXT"},
    "chunk_status": {"version": "TEXT", "rejected": "TEXT"},
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS file_progress (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  file_path TEXT UNIQUE NOT NULL,
  status TEXT NOT NULL CHECK(status IN ('pending', 'in_progress', 'completed', 'failed')),
  size_bytes INTEGER,
  processed_bytes INTEGER,
  checksum TEXT,
  s3_key TEXT,
  error_message TEXT,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_file_path ON file_progress(file_path);
CREATE INDEX IF NOT EXISTS idx_status ON file_progress(status);
CREATE INDEX IF NOT EXISTS idx_updated_at ON file_progress(updated_at);

CREATE TABLE IF NOT EXISTS file_status (
  file_id TEXT PRIMARY KEY,
  progress_id INTEGER UNIQUE NOT NULL REFERENCES file_progress(id) ON DELETE CASCADE,
  file_name TEXT NOT NULL,
  file_type TEXT,
  content_type TEXT,
  s3_bucket TEXT,
  s3_key TEXT,
  estimated_record_count INTEGER,
  chunk_size INTEGER,
  chunking_strategy TEXT NOT NULL DEFAULT 'FIXED_COUNT',
  total_chunks INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  processing_started_at TEXT,
  completed_at TEXT,
  last_updated_at TEXT NOT NULL,
  error_details TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  completed_chunks INTEGER NOT NULL DEFAULT 0,
  failed_chunks INTEGER NOT NULL DEFAULT 0,
  in_progress_chunks INTEGER NOT NULL DEFAULT 0,
  pending_chunks INTEGER NOT NULL DEFAULT 0,
  successful_records INTEGER NOT NULL DEFAULT 0,
  failed_records INTEGER NOT NULL DEFAULT 0,
  error_summary TEXT NOT NULL DEFAULT '{"validation": {}, "processing": {}}',
  run_id TEXT,
  after_success TEXT
);

CREATE TABLE IF NOT EXISTS chunk_status (
  chunk_id TEXT PRIMARY KEY,
  file_id TEXT NOT NULL REFERENCES file_status(file_id) ON DELETE CASCADE,
  chunk_index INTEGER NOT NULL CHECK(chunk_index >= 0),
  start_offset INTEGER NOT NULL,
  end_offset INTEGER NOT NULL,
  record_count INTEGER NOT NULL,
  status TEXT NOT NULL CHECK(status IN ('pending', 'in_progress', 'completed', 'failed')),
  processing_thread TEXT,
  started_at TEXT,
  completed_at TEXT,
  duration REAL,
  retry_count INTEGER NOT NULL DEFAULT 0,
  error_details TEXT,
  successful_records INTEGER NOT NULL DEFAULT 0,
  failed_records INTEGER NOT NULL DEFAULT 0,
  error_summary TEXT NOT NULL DEFAULT '{"validation": {}, "processing": {}}',
  s3_key TEXT,
  size_bytes INTEGER,
  sha256 TEXT,
  version TEXT,
  rejected TEXT,
  UNIQUE(file_id, chunk_index)
);
CREATE INDEX IF NOT EXISTS idx_chunk_file ON chunk_status(file_id, status);

CREATE TABLE IF NOT EXISTS upload_tasks (
  id TEXT PRIMARY KEY,
  file_id TEXT,
  source_file_path TEXT NOT NULL,
  s3_key TEXT NOT NULL,
  bucket TEXT NOT NULL,
  content_type TEXT NOT NULL,
  size INTEGER,
  uploaded_bytes INTEGER NOT NULL DEFAULT 0,
  upload_id TEXT,
  etag TEXT,
  checksum TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  status TEXT NOT NULL CHECK(status IN ('pending', 'uploading', 'verifying', 'completed', 'failed')),
  error TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  UNIQUE(bucket, s3_key, checksum)
);
CREATE INDEX IF NOT EXISTS idx_upload_file ON upload_tasks(file_id);

CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  status TEXT NOT NULL CHECK(status IN ('pending', 'processing', 'completed', 'failed')),
  file_name TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  errors TEXT NOT NULL DEFAULT '[]',
  output_csv_url TEXT
);

CREATE TABLE IF NOT EXISTS request_data (
  request_id TEXT NOT NULL REFERENCES requests(request_id) ON DELETE CASCADE,
  serial_number INTEGER NOT NULL,
  product_name TEXT NOT NULL,
  input_image_urls TEXT NOT NULL,
  output_image_urls TEXT NOT NULL DEFAULT '[]',
  errors TEXT NOT NULL DEFAULT '[]',
  created_at TEXT NOT NULL,
  completed_at TEXT,
  PRIMARY KEY (request_id, serial_number)
);
"""


def create_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing, and add the columns a store from an older version lacks."""
    for table, columns in _ADDED_COLUMNS.items():  # before the schema: its indexes may need them
        present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if present and name not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
