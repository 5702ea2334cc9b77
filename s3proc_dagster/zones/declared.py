"""The landing zones the code location declares, as their components built them.

A zone is a named set of settings (its source, destination, chunking, rules...) over the
deployment's, which its sensor puts in each run's config (`FilesConfig.zone`). The
components register themselves here when the definitions load, which every process of a
deployment does the same way from the same `defs.yaml` files, so this is a view of the
definitions, not state: the default zone's sensor leaves the zones' directories alone,
`s3proc process` finds the zone of a path, and two zones claiming one source (or landing
in one destination) are refused with both names before anything runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from s3proc_dagster.errors import SettingsError
from s3proc_dagster.sources.confined import lexically_below
from s3proc_dagster.transfer.keys import is_s3_uri, split_uri


@dataclass(frozen=True)
class DeclaredZone:
    name: str
    source: str  # a directory, or s3://bucket/prefix
    settings: Mapping[str, str]  # its settings by variable name, over the deployment's
    enabled: bool = True  # false: declared, its asset and history kept, not watched

    @property
    def directory(self) -> Path | None:
        return None if is_s3_uri(self.source) else Path(self.source).expanduser().resolve()

    @property
    def move_target(self) -> str:
        """Where `after_success: move:<target>` puts landed originals, or ""."""
        action = self.settings.get("ZONE_AFTER_SUCCESS", "")
        return action.removeprefix("move:") if action.startswith("move:") else ""

    def source_of(self, relative_path: str) -> str:
        """Where its file `relative_path` is: a path below its directory, or an s3:// URI.
        Not confined here: the run's first step refuses what is not below the source."""
        if self.directory is None:
            return f"{self.source.rstrip('/')}/{relative_path}"
        return str(self.directory / relative_path)

    @property
    def destination(self) -> str:
        """Its key prefix under the bucket, "" for the deployment's S3_PREFIX."""
        return self.settings.get("S3_PREFIX", "").strip("/")

    def shares_destination(self, other: DeclaredZone) -> bool:
        """One destination is the other's or inside it: the same key would hold both zones'
        datasets (`a/b.csv` of a zone landing in `x` is `b.csv` of one landing in `x/a`).
        Two zones without one share S3_PREFIX; a zone without one beside one with one cannot
        be told apart before S3_PREFIX is read, so only the zones' own spellings are compared."""
        a, b = self.destination, other.destination
        if not a or not b:
            return not a and not b
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    def claims(self, other: DeclaredZone) -> bool:
        """One source is the other's or inside it: a file would get two zones' runs."""
        a, b = _spelled(self.source), _spelled(other.source)
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")


_DECLARED: dict[str, DeclaredZone] = {}


def _spelled(source: str) -> str:
    if is_s3_uri(source):  # as S3 servers read it: SeaweedFS takes `\` for `/` and `a//b` for `a/b`
        bucket, prefix = split_uri(source)
        folders = [part for part in prefix.replace("\\", "/").split("/") if part]
        return f"s3://{bucket}/{'/'.join(folders)}".rstrip("/")
    return str(Path(source).expanduser().resolve())


def declare(zone: DeclaredZone) -> None:
    """Register a zone as its component builds; a zone that claims another's source is
    refused, and so is one that would move its landed files into a watched source (they
    would come back as new files, its own or another zone's)."""
    for other in _DECLARED.values():
        if other.name != zone.name and zone.claims(other):
            raise SettingsError(
                f"landing zones {other.name!r} and {zone.name!r} claim the same source "
                f"({other.source} and {zone.source}); give each zone a source of its own"
            )
    for other in _DECLARED.values():
        if other.name != zone.name and zone.shares_destination(other):
            raise SettingsError(
                f"landing zones {other.name!r} and {zone.name!r} land in the same destination "
                f"({other.destination or 'S3_PREFIX'} and {zone.destination or 'S3_PREFIX'}): a file of one would "
                "replace the other's dataset of the same path; give each zone a destination of its own"
            )
    target = zone.move_target
    if target and zone.source and is_s3_uri(target) != is_s3_uri(zone.source):
        raise SettingsError(
            f"landing zone {zone.name!r} moves landed files to {target}: a directory source moves "
            "to a directory, an S3 source to an s3://bucket/prefix"
        )
    others = [z for z in _DECLARED.values() if z.name != zone.name]
    # both ways: the zones load one by one, and a zone declared after the one that moves its
    # files into its source was never compared with that move
    moves = [(zone, other) for other in (zone, *others)] + [(other, zone) for other in others]
    for mover, watcher in moves:
        target = mover.move_target
        if target and watcher.source and DeclaredZone(mover.name, target, {}).claims(watcher):
            raise SettingsError(
                f"landing zone {mover.name!r} moves landed files to {target}, which zone "
                f"{watcher.name!r} watches ({watcher.source}): they would land again; move them elsewhere"
            )
    _DECLARED[zone.name] = zone


def declared() -> list[DeclaredZone]:
    return sorted(_DECLARED.values(), key=lambda z: z.name)


def zone_named(name: str) -> DeclaredZone | None:
    return _DECLARED.get(name)


def declared_directories() -> tuple[Path, ...]:
    """The directories declared zones watch: the default zone's sensor does not."""
    return tuple(d for z in _DECLARED.values() if (d := z.directory) is not None)


def declared_prefixes() -> tuple[str, ...]:
    """The S3 sources (s3://bucket/prefix) declared zones watch."""
    return tuple(z.source for z in _DECLARED.values() if z.directory is None)


def watched_below(bucket: str, prefix: str, zone: str = "") -> dict[str, str]:
    """The folders below `prefix` of `bucket` (where zone `zone`'s datasets land) that
    another declared zone watches as its S3 source, each with that zone's name; "" when the
    destination itself is inside one. An output landing there would come back in as that
    zone's file, and its `after_success: delete` or `move` would take the output away: with
    an empty S3_PREFIX the default zone lands across the whole bucket, so a zone watching
    `s3://<bucket>/campaign/` would take in every default-zone file of a folder `campaign`."""
    base, found = prefix.strip("/"), {}
    for other in _DECLARED.values():
        if other.name == zone or not is_s3_uri(other.source):
            continue  # a zone's own source inside its destination is a reserved folder already
        other_bucket, watched = split_uri(other.source)
        watched = watched.strip("/")
        if other_bucket != bucket:
            continue
        if not base:
            found[watched] = other.name
        elif not watched or watched == base or base.startswith(watched + "/"):
            found[""] = other.name
        elif watched.startswith(base + "/"):
            found[watched.removeprefix(base + "/")] = other.name
    return found


def zone_holding(directory: Path) -> DeclaredZone | None:
    """The declared zone whose directory is `directory` or holds it: WATCH_PATH given to a
    zone (its source written as WATCH_PATH itself, or a folder above it) is that zone's
    alone, or both sensors requested every file and it landed twice."""
    resolved = Path(directory).expanduser().resolve()
    for zone in _DECLARED.values():
        if (mine := zone.directory) is not None and (resolved == mine or mine in resolved.parents):
            return zone
    return None


def zone_of_path(target: str) -> DeclaredZone | None:
    """The declared zone whose source holds `target` (a path or an s3:// URI), if any."""
    for zone in _DECLARED.values():
        if is_s3_uri(target) and is_s3_uri(zone.source):
            if _spelled(target).startswith(_spelled(zone.source) + "/"):
                return zone
        elif zone.directory is not None and not is_s3_uri(target) and lexically_below(target, zone.directory):
            return zone
    return None
