"""Which objects under the S3 incoming prefix are new or changed: listing in passes.

S3 lists keys in order, so the cursor pages through the prefix with `StartAfter`, a few
pages per tick, and a tick's cost is bounded however many objects there are: in pages,
and in time. Every new object costs a HEAD, and a tick that outlives Dagster's 60-s call
to the code server fails and keeps its old cursor, so a flood of objects was looked at
again, and failed again, tick after tick; now the sensor stops after the last object it
had time for and the next tick resumes after it (`IncomingCursor.resumed_after`).

A *pass* is one walk from the first key to the last; an object is a candidate when it was
modified at or after the start of the previous pass, so new and overwritten objects (a
new LastModified) are found within one pass, and untouched ones are listed but never
requested again. Objects modified near a pass boundary can be listed by two passes; the
sensor drops those whose run key already has a run (two queries per `LOOKUP_CHUNK`
candidates in `defs.files.sensors`, never one per object in the bucket).
Objects still being uploaded (multipart not completed) are not listed by S3 at all, so
no stability wait is needed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from s3proc_dagster.sources.watch import is_ignored_name
from s3proc_dagster.transfer.keys import prefix_folder

CLOCK_SKEW = timedelta(seconds=5)


@dataclass(frozen=True)
class IncomingObject:
    bucket: str
    key: str
    relative_path: str  # below the incoming prefix: the same layout as a watched directory
    etag: str
    size: int
    last_modified: datetime

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def run_key(self) -> str:
        """One run per upload: key, ETag, size and LastModified. The same bytes uploaded again
        are a new arrival, as a local file written again is: its run skips the version it
        finds COMPLETED, and a zone that deletes or moves its files does so to this copy too
        (keyed by ETag alone, the copy got no run and stayed in the zone's source for good)."""
        return f"s3:{self.key}:{self.etag}:{self.size}:{self.last_modified.timestamp():.6f}"


@dataclass
class IncomingCursor:
    after: str = ""  # last key listed in the current pass
    since: str = ""  # ISO time: candidates were modified at or after it
    pass_started: str = ""

    def dumps(self) -> str:
        return json.dumps({"after": self.after, "since": self.since, "start": self.pass_started}, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | None) -> IncomingCursor | None:
        if not raw:
            return None
        d = json.loads(raw)
        return cls(d.get("after", ""), d.get("since", ""), d.get("start", ""))

    def resumed_after(self, key: str) -> IncomingCursor:
        """This pass, resumed after `key`: where a tick that ran out of time stops."""
        return IncomingCursor(after=key, since=self.since, pass_started=self.pass_started)


def start_cursor(cursor: IncomingCursor | None, now: datetime, ignore_initial: bool = False) -> IncomingCursor:
    """`cursor`, or the first pass's: everything there is (or, `ignore_initial`, what arrives from now on)."""
    if cursor is not None:
        return cursor
    since = (now - CLOCK_SKEW).isoformat() if ignore_initial else datetime.min.replace(tzinfo=UTC).isoformat()
    return IncomingCursor(after="", since=since, pass_started=now.isoformat())


def _skip(key: str, prefix: str, exclude_prefixes: tuple[str, ...]) -> bool:
    if any(key.startswith(p) for p in exclude_prefixes if p):
        return True
    rel = key[len(prefix) :]
    return key.endswith("/") or any(is_ignored_name(part) for part in rel.split("/") if part)


def list_incoming(
    client: Any,
    bucket: str,
    prefix: str,
    cursor: IncomingCursor | None,
    now: datetime,
    ignore_initial: bool = False,
    exclude_prefixes: tuple[str, ...] = (),
    page_size: int = 1000,
    max_pages: int = 5,
    deadline: float | None = None,
) -> tuple[list[IncomingObject], IncomingCursor]:
    """One tick: up to `max_pages` listing pages (and none begun after `deadline`, a
    `time.monotonic()`, once one is read); the objects to request and the next cursor.

    `exclude_prefixes` holds the product's own output prefix: output written below the
    incoming prefix must never come back in as input.
    """
    prefix = prefix_folder(prefix)
    cursor = start_cursor(cursor, now, ignore_initial)
    since = datetime.fromisoformat(cursor.since)
    found: list[IncomingObject] = []
    after = cursor.after
    for page_number in range(max_pages):
        if page_number and deadline is not None and time.monotonic() > deadline:
            break
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if after:
            kwargs["StartAfter"] = after
        page = client.list_objects_v2(**kwargs)
        for obj in page.get("Contents", []):
            after = obj["Key"]
            if _skip(obj["Key"], prefix, exclude_prefixes) or obj["LastModified"] < since:
                continue
            found.append(
                IncomingObject(
                    bucket,
                    obj["Key"],
                    obj["Key"][len(prefix) :],
                    obj["ETag"].strip('"'),
                    obj["Size"],
                    obj["LastModified"],
                )
            )
        if not page.get("IsTruncated"):
            # End of a pass: the next one looks for what changed since this one began
            # (less a margin for the clock difference between us and the S3 server).
            began = datetime.fromisoformat(cursor.pass_started)
            return found, IncomingCursor(after="", since=(began - CLOCK_SKEW).isoformat(), pass_started=now.isoformat())
    return found, IncomingCursor(after=after, since=cursor.since, pass_started=cursor.pass_started)


OBJECT_METADATA_NAMES = {"campaignid": "campaignId", "source": "source", "priority": "priority"}


def metadata_from_object(user_metadata: dict[str, str]) -> dict[str, str]:
    """S3 lowercases user-metadata names (`x-amz-meta-campaignid`); give back the spelling the specification uses (`campaignId`)."""
    return {OBJECT_METADATA_NAMES.get(k.lower(), k): v for k, v in user_metadata.items() if not k.startswith("x-")}
