"""The upload journal of the store contract: the multipart uploads in flight.

A record per upload keeps its S3 `upload_id`, so a retried, re-executed or restarted
upload resumes from the parts S3 already has, and one given up can be aborted. The
journal has no lifecycle to enforce: the upload itself (`transfer.upload`, through its
`UploadJournal` protocol) writes each task as it goes, and recovery lists what is left,
so a backend supplies all four operations and no rule sits on top of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from s3proc_dagster.models import S3UploadTask


class UploadStore(ABC):
    """Where every multipart upload in flight is recorded."""

    @abstractmethod
    def save_upload_task(self, task: S3UploadTask) -> None:
        """Insert or replace a multipart upload's record (by id)."""

    @abstractmethod
    def find_upload_task(self, bucket: str, s3_key: str, checksum: str) -> S3UploadTask | None:
        """The recorded upload of exactly these bytes (`checksum`) to this key, if any."""

    @abstractmethod
    def list_upload_tasks(self, file_id: str | None = None) -> list[S3UploadTask]: ...

    @abstractmethod
    def delete_upload_task(self, task_id: str) -> None: ...
