"""Which landing zone a file or a user's argument belongs to, and that zone's settings,
for every `s3proc` command.

A declared zone's file is named, parked, retried and run by its zone's settings (its
source as WATCH_PATH or S3_INCOMING_PREFIX, its error folder `ERROR_DIRECTORY/<zone>`,
its name in the file's id): a command reading the default zone's settings alone would
not find the file, would look for it in the wrong error folder, or would run it with
another zone's destination and rules. So every command asks here, and the answer is the
one the zone's sensor and runs use (`zones.declared.zone_of_path`,
`settings.zone_overrides`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from s3proc_dagster.errors import SettingsError
from s3proc_dagster.models import FileStatus
from s3proc_dagster.settings import Configuration, load_configuration, zone_overrides
from s3proc_dagster.sources.paths import ENTRY_SEPARATOR, FileRef, resolve_user_path
from s3proc_dagster.zones.declared import DeclaredZone, declared, zone_of_path


@dataclass(frozen=True)
class Zone:
    """One zone as a command sees it: its name ("" for the default zone) and its settings."""

    name: str
    cfg: Configuration
    declared: DeclaredZone | None = None  # None: the default zone

    @property
    def watch(self) -> Path:
        return self.cfg.monitoring.watch_path

    @property
    def error_dir(self) -> Path:
        return self.cfg.processing.error_directory

    @property
    def incoming_prefix(self) -> str:
        return self.cfg.s3.incoming_prefix

    @property
    def settings(self) -> Mapping[str, str] | None:
        """What its sensor puts in a run's config (`run_request_for(zone=...)`); None by default."""
        return self.declared.settings if self.declared is not None else None

    @property
    def enabled(self) -> bool:
        return self.declared is None or self.declared.enabled

    @property
    def is_directory(self) -> bool:
        return self.declared is None or self.declared.directory is not None

    @property
    def marker(self) -> str:
        """How a listing names a declared zone's file; nothing for the default zone's."""
        return f"  [zone {self.name}]" if self.name else ""


@dataclass(frozen=True)
class Zones:
    """The default zone and every declared zone whose settings load."""

    default: Zone
    declared: tuple[Zone, ...] = ()
    left_out: Mapping[str, str] | None = None  # zone name -> why its settings do not load

    def all(self) -> tuple[Zone, ...]:
        return (self.default, *self.declared)

    def named(self, name: str) -> Zone | None:
        return next((z for z in self.all() if z.name == name), None)

    def _holding(self, target: str) -> Zone:
        """The zone whose source holds `target`, else the default zone; a zone left out
        (its settings do not load) cannot be used, and saying so beats using another's."""
        found = zone_of_path(target)
        if found is None:
            return self.default
        zone = self.named(found.name)
        if zone is None:
            problem = (self.left_out or {}).get(found.name, "not loaded")
            raise SettingsError(f"landing zone {found.name} holds {target}, but its settings do not load: {problem}")
        return zone

    def of_record(self, record: FileStatus) -> Zone:
        """The zone a recorded file came from: the one whose source holds its path (an
        archive entry's archive), or whose incoming prefix holds its object."""
        if record.source_bucket and record.source_key:
            target = f"s3://{record.source_bucket}/{record.source_key}"
        else:
            target = record.file_path.partition(ENTRY_SEPARATOR)[0]
        try:
            return self._holding(target)
        except SettingsError:
            return self.default  # told on stderr when the zones loaded; its records read as the default's

    def of_argument(self, raw: str) -> Zone:
        """The zone a file named on the command line belongs to, spelled as `sources.resolve.locate`
        reads it: as given, else through its resolved folder (a symlinked checkout)."""
        if "://" in raw:
            return self._holding(raw)
        path = Path(os.path.normpath(os.path.abspath(raw)))
        if zone_of_path(str(path)) is None:
            path = path.parent.resolve() / path.name
        return self._holding(str(path))

    def file_ref(self, arg: str, cwd: Path) -> FileRef:
        """What `arg` names in any zone: each zone's reading (its source, its error folder,
        its file ids), so a zone's file is found as the default zone's are."""
        refs = [resolve_user_path(arg, z.watch, cwd, z.error_dir, z.name) for z in self.all()]
        return FileRef(
            arg,
            frozenset().union(*(r.file_paths for r in refs)),
            frozenset().union(*(r.file_ids for r in refs)),
        )


def load_zones(cfg: Configuration | None = None) -> Zones:
    """The deployment's settings, then the zones its code location declares, each with its
    settings over them. The definitions are loaded once per process (they are cached), as
    every process of the deployment loads them, so a command sees the zones the sensors
    see. A zone whose settings do not load (its directory gone) is left out with a line
    on stderr: a listing of the other zones' files is still worth having."""
    from s3proc_dagster.definitions import defs

    cfg = cfg or load_configuration()
    defs()  # the zones' components declare them as they build
    loaded: list[Zone] = []
    left_out: dict[str, str] = {}
    for zone in declared():
        try:
            overrides = zone_overrides(zone.settings, cfg.processing.error_directory)
            loaded.append(Zone(zone.name, load_configuration(overrides=overrides), zone))
        except SettingsError as exc:
            left_out[zone.name] = " ".join(str(exc).split())
            print(f"s3proc: landing zone {zone.name} left out: {left_out[zone.name]}", file=sys.stderr)
    return Zones(Zone("", cfg), tuple(loaded), left_out)
