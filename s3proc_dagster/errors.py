"""Errors a user can act on. Each names what went wrong and, where it helps, what to do."""


class S3ProcError(Exception):
    """Base of every error the product raises on purpose."""


class SettingsError(S3ProcError):
    """A setting is missing or invalid; the message names every bad variable."""


class IllegalTransition(S3ProcError):
    """A status change the seed's state machine does not allow."""


class RecordNotFound(S3ProcError):
    """No progress record for that path, fileId, chunkId or requestId."""


class UnsupportedFileError(S3ProcError):
    """The file's content does not match what its name claims, or cannot be read."""


class UnsafeArchiveError(S3ProcError):
    """An archive entry would escape the extraction directory or exceed a limit."""


class ConversionError(S3ProcError):
    """A tabular file could not be turned into Parquet."""


class ChecksumMismatch(S3ProcError):
    """An object in S3 does not have the bytes we uploaded."""


class ImageRequestError(S3ProcError):
    """A product CSV or one of its images cannot be processed."""
