"""Schema drift: a file whose columns differ from what its zone landed last.

A reader of a zone's datasets (a query over all of a partner's files) breaks when one
file adds, drops or retypes a column. The difference is said in words a data engineer
acts on, and the zone's `schema_drift` decides what it costs the file: a warning (a
failed, WARN check on its partition; the file lands) or, `blocking`, the file FAILED with
the difference as its reason before anything lands.
"""

from __future__ import annotations

from collections.abc import Sequence

from s3proc_dagster.errors import UnsupportedFileError

Columns = Sequence[tuple[str, str]]


BLOCKED = "(schema_drift: blocking)"  # ends the reason a blocking zone gives a refused file


class SchemaDrift(UnsupportedFileError):
    """A blocking zone refused a file whose columns differ from its last landing."""


def blocked(reason: str | None) -> bool:
    """Whether a FAILED file's recorded reason is a blocking zone's refusal."""
    return BLOCKED in (reason or "")


def difference(before: Columns, now: Columns, typed: bool = True) -> str:
    """`added a (BIGINT); removed b; retyped c: BIGINT -> VARCHAR`, or "" when they agree.
    `typed=False` for a file without a record (a header alone): its types are guesses
    (every column VARCHAR), so only its columns' names are compared."""
    old, new = dict(before), dict(now)
    parts = [f"added {name} ({kind})" for name, kind in now if name not in old]
    parts += [f"removed {name}" for name, _ in before if name not in new]
    if typed:
        parts += [f"retyped {name}: {old[name]} -> {kind}" for name, kind in now if name in old and old[name] != kind]
    return "; ".join(parts)


def guard(
    before: Columns | None, blocking: bool, found: dict[str, str], name: str, now: Columns, records: bool = True
) -> None:
    """Called with a file's columns before its first row is written (`records`: whether it
    has any): records the difference in `found` (under `name`), and refuses the file when
    `blocking`."""
    if not before:
        return  # the zone's first landing sets its columns
    diff = difference(before, now, typed=records)
    if not diff:
        return
    found[name] = diff
    if blocking:
        raise SchemaDrift(f"{name}: its columns differ from the zone's last landing: {diff} {BLOCKED}")
