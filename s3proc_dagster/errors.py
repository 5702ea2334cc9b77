"""Errors a user can act on, and the one place that decides which of them a retry can cure.

Each error names what went wrong and, where it helps, what to do. `is_transient` is the
whole retry policy in one function: an error is retried with backoff only when waiting
can change the outcome (a network fault, S3 briefly unavailable, another run holding
the file); bad input and refused access fail at once, because the same bytes and the
same permissions give the same answer on every attempt.
"""

from __future__ import annotations

import errno


class S3ProcError(Exception):
    """Base of every error the product raises on purpose. Permanent unless it says otherwise."""

    transient = False


class SettingsError(S3ProcError):
    """A setting is missing or invalid; the message names every bad variable."""


class IllegalTransition(S3ProcError):
    """A status change the state machine does not allow (a bug or a misuse, never contention)."""


class DuplicateRecord(IllegalTransition):
    """Creating a record that exists (a request id used twice)."""


class ConcurrencyConflict(S3ProcError):
    """Another writer changed the record between our read and our write, too many times in a row."""

    transient = True


class FileBusy(ConcurrencyConflict):
    """Another live run holds the file; `holder` is its run id."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


class VersionSuperseded(S3ProcError):
    """The store now records a newer version of the file than the one this run is processing."""


class RecordNotFound(S3ProcError):
    """No progress record for that path, fileId, chunkId or requestId."""


class SourceChanged(S3ProcError):
    """The source no longer has the bytes the store recorded for this version."""


class UnsupportedFileError(S3ProcError):
    """The file's content does not match what its name claims, or cannot be read."""


class UnsafeSourceError(UnsupportedFileError):
    """A file's name, link or size would make the product read, write or spend beyond its bounds.

    Whoever drops files is not trusted: a link out of the watched directory, a key with a
    newline or `..`, a name inside another file's dataset or the product's own key space,
    a sparse file of terabytes. Permanent: the same name fails the same way every time.
    """


class UnsafeArchiveError(S3ProcError):
    """An archive entry would escape the extraction directory or exceed a limit."""


class ConversionError(S3ProcError):
    """A tabular file could not be turned into Parquet."""


class ChecksumMismatch(S3ProcError):
    """An object in S3 does not have the bytes we uploaded.

    Transient: the usual cause is an upload cut short, which a retry sends again.
    """

    transient = True


class ObjectMissing(S3ProcError):
    """An object we expected in S3 is not there (an upload cut short, or deleted meanwhile)."""

    transient = True


class ObjectUnreadable(S3ProcError):
    """An object could not be read back from S3 (a network error, a 5xx, a missing key)."""

    transient = True


class NotReadable(S3ProcError):
    """A recorded file has no output `s3proc read` can give back: not COMPLETED yet, an
    archive (its entries are the files), or a dataset without its committed manifest."""


class ImageRequestError(S3ProcError):
    """A product CSV or one of its images cannot be processed."""


# OSErrors that no retry can cure: the file is not there, not readable, or not a file.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.ELOOP}


#: S3 answers that no retry can cure: wrong credentials, no such bucket, no permission.
PERMANENT_S3_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "AllAccessDisabled",
    }
)


def s3_error_code(exc: BaseException) -> str | None:
    """botocore's error code (`NoSuchKey`, `AccessDenied`...), without importing botocore."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying after a delay can make this error go away."""
    if isinstance(exc, S3ProcError):
        return exc.transient
    if s3_error_code(exc) in PERMANENT_S3_CODES:
        return False
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    # A bug or bad data fails the same way every time; anything else (network, S3, a full
    # disk someone may clear, the unknown) may pass on a later attempt.
    return not isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, AssertionError))
