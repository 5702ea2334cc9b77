"""Compare-and-set, the one kind of write every rule of the store contract is built on.

A rule reads a record, decides, and writes only if the record is still in the status it
read (and, for a file, still held by the run it read); when another process wrote first,
it reads again. Many Dagster run processes write at once, and none of them holds a lock
while it decides. After `CAS_ATTEMPTS` lost races a rule gives up with
ConcurrencyConflict rather than retry forever.
"""

from __future__ import annotations

from typing import Final

CAS_ATTEMPTS = 50


class _Any:
    """Marker: a compare-and-set that does not care who holds the record."""


ANY_HOLDER: Final = _Any()
