"""`LandingZone`: one source of files declared in `defs.yaml`, its own sensor, asset and checks.

    dg scaffold defs s3proc_dagster.LandingZone zones/partner_orders

writes `defs/zones/partner_orders/defs.yaml`; every attribute but `source` is optional and
defaults to the deployment's setting of the same meaning (`settings.py`). A zone is its settings over
the deployment's (its source as WATCH_PATH or S3_INCOMING_PREFIX, its destination as
S3_PREFIX, its chunking and rules), which its sensor puts in every run's config: the
zones share the jobs, the run queue, the stores and the S3 resource, and a run processes
its files by its zone's rules as they were when it started.

Its sensor, `<name>_zone_sensor`, is made with the file jobs it starts
(`defs/files/sensors.py:zone_sensor`). In the catalog a zone is one asset, `zones/<name>`, with its group, owners,
kinds and description and its destination as metadata, defined by the file jobs' seven
ops (materializing a partition lands that file), partitioned by file path (one
dynamic partition per path, each version a new materialization of it, its chunks a
table in the materialization's metadata), and two checks per partition: `landed` (the
file's latest version landed, or FAILED with the reason) and `schema_drift`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import yaml
from pydantic import Field, ValidationError, field_validator

from s3proc_dagster.defs.files import events
from s3proc_dagster.defs.files.jobs import file_steps
from s3proc_dagster.defs.files.ops import checksum_calculation
from s3proc_dagster.defs.resources import ProgressStoreResource
from s3proc_dagster.errors import SettingsError
from s3proc_dagster.models import FileStatus, ProcessingStatus, make_file_id
from s3proc_dagster.settings import after_success_action, zone_glob
from s3proc_dagster.transfer.keys import is_s3_uri, split_uri
from s3proc_dagster.zones.declared import DeclaredZone, declare
from s3proc_dagster.zones.drift import blocked, difference

KINDS = {"s3", "parquet"}


class LandingZoneScaffolder(dg.Scaffolder):
    """`dg scaffold defs s3proc_dagster.LandingZone zones/<name>`: a defs.yaml that names and
    explains every attribute, so the user edits it instead of looking them up."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        lines = [f"type: {request.type_name}", "", "attributes:"]
        for name, info in LandingZone.model_fields.items():
            example = _EXAMPLES.get(name)
            lines.append(f"  # {name}: {info.description}")
            lines.append(f"  {name}: {example}" if example is not None else f"  # {name}:")
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text("\n".join(lines) + "\n")


_EXAMPLES = {"source": "data/partner_orders", "destination": "partner/orders"}


@dg.scaffold_with(LandingZoneScaffolder)
class LandingZone(dg.Component, dg.Resolvable, dg.Model):
    """A landing zone: one source of files with its destination, rules, chunking and owners.

    Example:
        type: s3proc_dagster.LandingZone
        attributes:
          source: s3://partner-drop/orders
          destination: partner/orders
          chunk_size: 100000
          after_success: move:s3://partner-drop/done
          owners: [team:data-platform]
    """

    name: str | None = Field(None, description="the zone's name in the catalog and in tags; default: its folder's name")
    source: str | None = Field(
        None,
        description="the directory watched (a relative one is below the project), or s3://bucket/prefix "
        "(required: WATCH_PATH and S3_INCOMING_PREFIX are the default zone's; name one here to give it to this zone)",
    )
    destination: str | None = Field(
        None, description="the key prefix under S3_BUCKET its datasets land under; default: S3_PREFIX"
    )
    include: list[str] | None = Field(None, description="path globs below the source a file must match (default: all)")
    exclude: list[str] | None = Field(None, description="path globs below the source that leave a file alone")
    chunk_size: int | None = Field(None, gt=0, description="records per Parquet chunk; default: CHUNK_SIZE")
    compression: Literal["ZSTD", "SNAPPY"] | None = Field(
        None, description="Parquet compression; default: PARQUET_COMPRESSION"
    )
    csv_null_strings: list[str] | None = Field(
        None, description="CSV/TSV values read as NULL, e.g. ['NA', '']; default: CSV_NULL_STRINGS"
    )
    rules: str | None = Field(
        None,
        description="a folder of rule sets (like dbt_like_sql/validations), relative to the project; default: VALIDATION_RULES_DIR",
    )
    priority: int | None = Field(
        None, ge=-100, le=100, description="its runs' priority in the run queue, -100 to 100 (default 0)"
    )
    after_success: str | None = Field(
        None,
        description="keep, delete, or move:<directory (relative: below the project) or s3://bucket/prefix>, "
        "once a version is committed (default keep)",
    )
    lineage_columns: bool | None = Field(
        None, description="add _source_file, _source_row, _file_sha256 and _landed_at to every row (default false)"
    )
    schema_drift: Literal["off", "warn", "blocking"] | None = Field(
        None, description="a file whose columns differ from the zone's last landing: warn (default), blocking, or off"
    )
    group: str | None = Field(None, description="the catalog group of its asset (default landing_zones)")
    owners: list[str] | None = Field(None, description="its asset's owners: emails or team:<name>")
    description: str | None = Field(None, description="what the zone holds, for the catalog")
    enabled: bool = Field(True, description="false: the zone is declared (its asset and history stay) but not watched")

    # checked here, so `dg check defs` names the zone's defs.yaml: its runs load the same
    # values through `settings.ZoneConfig`, where a bad one failed every tick of its sensor
    @field_validator("after_success")
    @classmethod
    def _after_success(cls, value: str | None) -> str | None:
        return None if value is None else after_success_action(value)

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [zone_glob(pattern) for pattern in value]

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return self.definitions(self.name or context.path.name, context.project_root)

    def definitions(self, name: str, project_root: Path | None) -> dg.Definitions:
        """The zone's asset and checks, the zone declared (`zones.declared`)."""
        if not (self.source or "").strip():
            # without one, its sensor watched WATCH_PATH beside the default zone's (every file
            # landed twice), and it claimed the process's working directory as its own
            raise SettingsError(
                f"landing zone {name!r} has no source: give it a directory or an s3://bucket/prefix "
                "(WATCH_PATH or S3_INCOMING_PREFIX itself, to take it over from the default zone)"
            )
        settings = self.zone_settings(name, project_root)
        declare(DeclaredZone(name, _below(self.source or "", project_root), settings, self.enabled))
        partitions = dg.DynamicPartitionsDefinition(name=events.zone_partitions(name))

        @dg.graph_asset(
            key=events.zone_asset_key(name),
            group_name=self.group or "landing_zones",
            owners=self.owners or [],
            description=(self.description or f"Files landing from {self.source}.")
            + ("" if self.enabled else " Disabled (enabled: false): not watched; its history stays."),
            kinds=KINDS,
            metadata={
                "source": self.source,
                "destination": self.destination or "S3_PREFIX",
                "enabled": self.enabled,
            },
            partitions_def=partitions,
        )
        def zone() -> Any:
            # the file jobs' seven ops: materializing a partition lands that file as its
            # sensor's run would (`batching.zone_materialized` names it from the partition)
            return file_steps(checksum_calculation())

        # its sensor joins the code location's with the jobs it starts (`definitions.py`)
        return dg.Definitions(assets=[zone], asset_checks=[_checks(name, zone.key, partitions)])

    def zone_settings(self, name: str, project_root: Path | None = None) -> dict[str, str]:
        """The zone as settings over the deployment's, by variable name."""
        out = {"ZONE_NAME": name, "ZONE_SCHEMA_DRIFT": self.schema_drift or "warn"}
        if self.source and is_s3_uri(self.source):
            bucket, prefix = split_uri(self.source)
            out |= {"S3_INCOMING_BUCKET": bucket, "S3_INCOMING_PREFIX": prefix.strip("/")}
        elif self.source:
            out["WATCH_PATH"] = _below(self.source, project_root)
        rules = _below(self.rules, project_root) if self.rules else None
        after_success = self.after_success
        if after_success and after_success.startswith("move:"):
            after_success = "move:" + _below(after_success.removeprefix("move:"), project_root)
        given = {
            "S3_PREFIX": self.destination,
            "ZONE_INCLUDE": ",".join(self.include) if self.include is not None else None,
            "ZONE_EXCLUDE": ",".join(self.exclude) if self.exclude is not None else None,
            "CHUNK_SIZE": self.chunk_size,
            "PARQUET_COMPRESSION": self.compression,
            "CSV_NULL_STRINGS": ",".join(self.csv_null_strings) if self.csv_null_strings is not None else None,
            "VALIDATION_RULES_DIR": rules,
            "ZONE_PRIORITY": self.priority,
            "ZONE_AFTER_SUCCESS": after_success,
            "ZONE_LINEAGE_COLUMNS": self.lineage_columns,
        }
        out |= {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in given.items() if v is not None}
        return out


def _below(path: str, project_root: Path | None) -> str:
    """A relative directory in `defs.yaml` (its `source`, `rules`, a `move:` target) is below
    the project, as the scaffold's `data/partner_orders` means, wherever the process that
    loads the zone runs (the code server, a run, `s3proc` in another folder); an absolute one
    or an s3:// URI as written."""
    if is_s3_uri(path) or Path(path).is_absolute() or project_root is None:
        return path
    return str(project_root / path)


def _schema_result(
    instance: dg.DagsterInstance, key: dg.AssetKey, path: str, record: FileStatus | None
) -> dg.AssetCheckResult:
    """The file's latest landing's columns against the zone's landing just before it; a file
    a blocking zone refused, by the difference its record keeps (run again from the UI, the
    check said "not landed yet", passed, over the refusal its landing run had reported)."""
    if record is not None and record.status is ProcessingStatus.FAILED and blocked(record.error_details):
        return dg.AssetCheckResult(
            check_name=events.SCHEMA_CHECK,
            asset_key=key,
            passed=False,
            description=record.error_details,
            metadata={"blocked": True},
        )
    mine = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[path]), limit=1)
    if not mine.records:
        return dg.AssetCheckResult(
            check_name=events.SCHEMA_CHECK, asset_key=key, passed=True, description="not landed yet"
        )
    latest = mine.records[0]
    before = events.landed_columns(instance, key, before_storage_id=latest.storage_id)
    now = events.columns_of(latest.asset_materialization)
    typed = events.rows_of(latest.asset_materialization) != 0
    diff = difference(before, now, typed) if before and now else ""
    return dg.AssetCheckResult(
        check_name=events.SCHEMA_CHECK,
        asset_key=key,
        passed=not diff,
        severity=dg.AssetCheckSeverity.WARN,
        description=diff or "the same columns as the zone's landing before it",
    )


def _checks(name: str, key: dg.AssetKey, partitions: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    """The zone's two checks, evaluated per partition by the runs that land its files;
    run from the UI, `landed` reads the file's record again."""

    @dg.multi_asset_check(
        specs=[
            dg.AssetCheckSpec(
                events.LANDED_CHECK,
                asset=key,
                partitions_def=partitions,
                description="the file's latest version landed (COMPLETED), or FAILED with the reason",
            ),
            dg.AssetCheckSpec(
                events.SCHEMA_CHECK,
                asset=key,
                partitions_def=partitions,
                description="the file's columns against the zone's last landing (added, removed, retyped)",
            ),
        ],
        name=f"{name}_zone_checks",
        can_subset=True,
    )
    def zone_checks(context, progress_store: ProgressStoreResource) -> Iterator[dg.AssetCheckResult]:
        path = context.op_execution_context.partition_key
        record = progress_store.open().get(make_file_id(path, name))
        selected = {key.name for key in context.selected_asset_check_keys}
        if events.LANDED_CHECK in selected:
            status = record.status.name if record else "not recorded"
            yield dg.AssetCheckResult(
                check_name=events.LANDED_CHECK,
                asset_key=key,
                passed=record is not None and record.status is ProcessingStatus.COMPLETED,
                description=f"{path}: {status}"
                + (f": {record.error_details}" if record and record.error_details else ""),
            )
        if events.SCHEMA_CHECK in selected:
            yield _schema_result(context.instance, key, path, record)

    return zone_checks


def zones_in(folder: Path, project_root: Path) -> dg.Definitions:
    """The zones declared in `folder/<name>/defs.yaml` (S3PROC_ZONES_DIR): zones a deployment
    declares beside the image instead of in it, e.g. from a ConfigMap."""
    found = []
    for path in sorted(folder.glob("*/defs.yaml")):
        try:  # dg names a defs/ zone's file in its errors; here this does
            document = yaml.safe_load(path.read_text()) or {}
            kind = document.get("type") if isinstance(document, dict) else None
            if kind not in ("s3proc_dagster.LandingZone", "s3proc_dagster.components.LandingZone"):
                # a typo in `type` left the zone undeclared without a word, its files unwatched
                raise SettingsError(f"type is {kind!r}: this folder holds type: s3proc_dagster.LandingZone only")
            zone = LandingZone.model_validate(document.get("attributes") or {})
            found.append(zone.definitions(zone.name or path.parent.name, project_root))
        except (yaml.YAMLError, ValidationError, SettingsError) as exc:
            raise SettingsError(f"landing zone {path.parent.name!r} ({path}, S3PROC_ZONES_DIR): {exc}") from exc
    return dg.Definitions.merge(*found) if found else dg.Definitions()
