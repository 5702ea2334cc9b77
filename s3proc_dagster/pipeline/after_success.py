"""After success: what a zone does with a file's original once its version is COMPLETED.

`keep` (the default) leaves it. `delete` and `move:<directory or s3://bucket/prefix>` act
only on a COMPLETED version whose output S3 proves whole (the dataset's committed manifest
names this version and every part it lists is there; a plain object carries this
version's `x-sha256`), and only on an original that still is that version: a file
replaced meanwhile is a newer version, its own run's, and is never deleted or moved for
the old one. A move never replaces what is at its target: a file already there (an
earlier version of the same name) stays, and the new one goes beside it as
`<name>.v-<sha16>.<ext>`. The action is written `(pending)` with the COMPLETED record
itself, then replaced by what was done, so a crash between the two is finished by crash
recovery (`recovery.reconcile` calls `finish_pending`), never applied twice. A FAILED
file is never touched: it is parked, as always.
"""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Any

from s3proc_dagster.errors import UnsafeSourceError, s3_error_code
from s3proc_dagster.files.checksum import sha256_stream
from s3proc_dagster.logs import about, get_logger
from s3proc_dagster.models import FileStatus, FileType, ProcessingStatus
from s3proc_dagster.sources.confined import confined_path, lexically_below, move_below, open_regular, unlink_below
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.keys import is_s3_uri, join_key, split_uri
from s3proc_dagster.transfer.manifest import is_intact, read_manifest
from s3proc_dagster.transfer.verify import head

log = get_logger("pipeline")
PENDING = " (pending)"


def planned(action: str) -> str | None:
    """What to write with the COMPLETED record: the action still to take, or nothing for keep."""
    return None if action == "keep" else f"{action}{PENDING}"


def finish_pending(store: ProgressStore, client: Any, bucket: str, roots: tuple[Path | str, ...]) -> list[str]:
    """Every COMPLETED file whose after_success is still pending (a crash came between):
    take the action now, by the same checks. What was done, one line per file."""
    done = []
    for record in store.list_files(ProcessingStatus.COMPLETED):
        if record.after_success and record.after_success.endswith(PENDING):
            done.append(f"{record.file_path}: {apply(store, client, bucket, record, roots)}")
    return done


def apply(store: ProgressStore, client: Any, bucket: str, record: FileStatus, roots: tuple[Path | str, ...]) -> str:
    """Take the record's pending action on its original; record and return what was done."""
    action = (record.after_success or "").removesuffix(PENDING)
    outcome = _outcome(client, bucket, record, action, roots)
    store.update_file(record.file_id, after_success=outcome)
    log.info("%s: after success: %s", record.file_path, outcome, extra=about(record.file_id))
    return outcome


def again(
    store: ProgressStore, client: Any, bucket: str, file_id: str, action: str, roots: tuple[Path | str, ...]
) -> str | None:
    """The same bytes dropped again at a path whose version is COMPLETED (a producer that
    sends a file twice): they are landed already, so the zone's action applies to this copy
    as it did to the first, by the same checks; without it a zone that deletes or moves its
    files kept the copy in its source for good, its record saying it was deleted or moved.
    Written `(pending)` first like any action, so recovery finishes it after a crash."""
    pending = planned(action)
    if pending is None:
        return None
    store.update_file(file_id, after_success=pending)
    return apply(store, client, bucket, store.require(file_id), roots)


def _outcome(client: Any, bucket: str, record: FileStatus, action: str, roots: tuple[Path | str, ...]) -> str:
    if not _output_proven(client, bucket, record):
        return f"not {_done(action)}: S3 does not hold this version's output whole"
    if is_s3_uri(record.file_path):
        return _on_object(client, record, action, roots)
    local = (Path(r) for r in roots if not is_s3_uri(str(r)))  # the directories; S3 sources are the objects'
    root = next((r for r in local if lexically_below(record.file_path, r)), None)
    original = confined_path(record.file_path, root) if root else None
    if original is None or not _still(original, record, root):
        return f"not {_done(action)}: the original is gone, not below its zone's source, or a newer version"
    try:  # through the folders' descriptors: a folder swapped for a link meanwhile leads nowhere
        if action == "delete":
            unlink_below(original, root)
            return "deleted"
        place = Path(action.removeprefix("move:"))
        target = confined_path(place / original.relative_to(root), place)
        if target is None:
            return f"not moved: a link in {place}"
        if os.path.lexists(target):  # an earlier version moved there: kept, this one beside it
            target = target.with_name(versioned_name(target.name, record.checksum))
        move_below(original, root, target, place)  # a rename, or a copy renamed into place: never half a file
        return f"moved to {target}"
    except (UnsafeSourceError, OSError) as exc:
        return f"not {_done(action)}: {getattr(exc, 'strerror', None) or exc}"


def versioned_name(name: str, checksum: str | None) -> str:
    """`daily.csv` as `daily.v-<sha16>.csv`: where a version goes when an earlier one
    already stands at its name in the move target (a daily drop of one name keeps them all)."""
    lead = "." if name.startswith(".") else ""
    stem, dot, suffix = name[len(lead) :].partition(".")
    return f"{lead}{stem}.v-{(checksum or '')[:16]}{dot}{suffix}"


def _output_proven(client: Any, bucket: str, record: FileStatus) -> bool:
    key = record.output_key or ""
    if record.file_type is FileType.DATABASE:
        manifest = read_manifest(client, bucket, key)
        return bool(manifest and manifest.file_sha256 == record.checksum and is_intact(client, bucket, manifest))
    if record.file_type is FileType.ARCHIVE:
        return True  # its entries' records were each COMPLETED against their own outputs first
    found = head(client, bucket, key)
    return bool(found and found.get("Metadata", {}).get("x-sha256") == record.checksum)


def _still(original: Path, record: FileStatus, root: Path) -> bool:
    """The original has the bytes of the version that completed."""
    try:
        with open_regular(original, (root,)) as readable:
            return sha256_stream(readable) == record.checksum
    except OSError:
        return False


def _on_object(client: Any, record: FileStatus, action: str, roots: tuple[Path | str, ...]) -> str:
    """An incoming object: acted on only while it holds the bytes of the version that
    completed, read again and hashed, as a local original is (`_still`). Its upload time
    cannot tell: S3 keeps it in whole seconds, so an overwrite in the second the version's
    run began looked unchanged and was deleted unprocessed. A move copies exactly the object
    hashed (`CopySourceIfMatch` its ETag); S3 has no conditional delete, so what is left is
    the moment between the last look and the delete."""
    bucket, key = split_uri(record.file_path)
    etag = _holding(client, bucket, key, record)
    if etag is None:
        return f"not {_done(action)}: the object is gone or holds another version's bytes"
    moved_to = None
    if action.startswith("move:"):
        target_bucket, target_prefix = split_uri(action.removeprefix("move:"))
        target = join_key(target_prefix, _below_source(record.file_path, roots) or key)
        if head(client, target_bucket, target) is not None:  # an earlier version moved there: kept
            folder, _, name = target.rpartition("/")
            target = join_key(folder, versioned_name(name, record.checksum))
        copy = {"Bucket": bucket, "Key": key}
        client.copy_object(Bucket=target_bucket, Key=target, CopySource=copy, CopySourceIfMatch=etag)
        moved_to = f"s3://{target_bucket}/{target}"
    found = head(client, bucket, key)
    if found is None or found.get("ETag") != etag:
        kept = f" (this version's copy is at {moved_to})" if moved_to else ""
        return f"not {_done(action)}: the object was written again meanwhile{kept}"
    client.delete_object(Bucket=bucket, Key=key)
    return f"moved to {moved_to}" if moved_to else "deleted"


def _below_source(uri: str, roots: tuple[Path | str, ...]) -> str | None:
    """An object's key below the S3 source it came from (`day1/a.csv` of
    `s3://drop/partner/day1/a.csv`), as a local move keeps the path below its directory."""
    prefixes = [str(r).rstrip("/") + "/" for r in roots if is_s3_uri(str(r))]
    below = [p for p in prefixes if uri.startswith(p)]
    return uri[len(max(below, key=len)) :] if below else None  # the innermost: a zone's inside the default's


def _done(action: str) -> str:
    return "deleted" if action == "delete" else "moved"


def _holding(client: Any, bucket: str, key: str, record: FileStatus) -> str | None:
    """The object's ETag when its bytes are the record's version (size, then SHA-256), else None."""
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if s3_error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise
    if obj["ContentLength"] != record.file_size:
        obj["Body"].close()
        return None
    with closing(obj["Body"]) as body:
        return obj["ETag"] if sha256_stream(body) == record.checksum else None
