"""Landing zones: sources declared as LandingZone components, each with its own rules and catalog entry."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from benchmarks.support import Deployment, csv_bytes, list_keys, promo_rows, wait_for, write_csv
from s3proc_dagster.components.landing_zone import LandingZone, _schema_result, zones_in
from s3proc_dagster.defs.files.events import zone_asset_key
from s3proc_dagster.defs.files.sensors import zone_sensor
from s3proc_dagster.defs.resources import Settings, resources_for
from s3proc_dagster.errors import SettingsError
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.models import make_file_id
from s3proc_dagster.pipeline import after_success
from s3proc_dagster.runs.reconstructable import definitions
from s3proc_dagster.transfer.manifest import read_manifest
from s3proc_dagster.zones.declared import DeclaredZone, declare, watched_below
from s3proc_dagster_tests.pipeline_helpers import (
    ROOT,
    execute,
    graphql,
    read_dataset,
    reconcile,
    run_requests_under,
    sensor_tick,
    source_rows,
)
from s3proc_dagster_tests.test_batching import BATCH_ROWS_PER_FILE, SINGLE_RUN_ROWS, batch_run, event_rows
from s3proc_dagster_tests.test_operations import watch_sensor_cursor
from s3proc_dagster_tests.test_s3_incoming import put

_CURSORS: dict[str, str | None] = {}


def zone_of(name: str, **attributes: object) -> DeclaredZone:
    """A zone as its defs.yaml declares it, registered as loading the definitions would."""
    component = LandingZone.model_validate(attributes)
    zone = DeclaredZone(name, component.source or "", component.zone_settings(name, ROOT))
    declare(zone)
    return zone


def tick(deployment: Deployment, zone: DeclaredZone, **settings: str) -> list[dg.RunRequest]:
    """One evaluation of the zone's sensor on the real instance, its cursor carried over;
    `settings` override the deployment's for this tick (`BATCH_FILES="true"`)."""
    sensor = zone_sensor(zone)
    resources = resources_for(Settings(overrides=settings)) if settings else definitions().resources
    with dg.build_sensor_context(
        instance=deployment.instance(), cursor=_CURSORS.get(zone.name), resources=resources
    ) as context:
        result = sensor.evaluate_tick(context)
    _CURSORS[zone.name] = result.cursor
    return list(result.run_requests or [])


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def test_two_zones_land_each_file_under_their_own_destination_with_their_own_rules(
    deployment: Deployment, tmp_path: Path
) -> None:
    drop = tmp_path / "partner"
    drop.mkdir()
    no_rules = tmp_path / "no-rules"
    no_rules.mkdir()
    local = zone_of(
        unique("partner"), source=str(drop), destination="partner/orders", chunk_size=40, rules=str(no_rules)
    )
    remote_prefix = f"zones-{uuid.uuid4().hex[:6]}/campaign"
    remote = zone_of(
        unique("campaign"),
        source=f"s3://{deployment.s3.bucket}/{remote_prefix}",
        destination="campaign/exports",
        chunk_size=25,
        rules=str(ROOT / "dbt_like_sql" / "validations"),
    )
    ours, their_rows = promo_rows(100, seed=3), promo_rows(60, seed=4)
    ours[0][1] = their_rows[0][1] = "bad code"  # only a zone with the rule set rejects it
    src = write_csv(drop / "day1" / "promo_orders.csv", ours)
    put(deployment, f"{remote_prefix}/promo_1.csv", csv_bytes(their_rows))

    (from_dir,) = tick(deployment, local)
    (from_s3,) = tick(deployment, remote)
    assert from_dir.tags["s3proc/zone"] == local.name and from_s3.tags["s3proc/zone"] == remote.name
    for request in (from_dir, from_s3):
        assert execute(request, deployment).success

    store = deployment.store()
    mine = store.get(make_file_id("day1/promo_orders.csv", local.name))
    assert mine.status is S.COMPLETED and mine.output_key == "partner/orders/day1/promo_orders.csv"
    assert [c.record_count for c in store.list_chunks(mine.file_id)] == [40, 40, 20]  # the zone's chunk size
    assert read_dataset(deployment, "partner/orders/day1/promo_orders.csv", tmp_path) == source_rows(src, "read_csv")
    theirs = store.get(make_file_id("promo_1.csv", remote.name))
    assert theirs.status is S.COMPLETED and theirs.output_key == "campaign/exports/promo_1.csv"
    assert [c.record_count for c in store.list_chunks(theirs.file_id)] == [25, 25, 10]
    assert theirs.error_summary["validation"] == {"invalidPromoCode": 1}  # the zone's rule set ran on it
    assert not mine.error_summary.get("validation")  # its zone has no rule set: the bad code landed
    assert list_keys(deployment, f"{deployment.prefix}/day1/") == []  # nothing under the default destination


def test_two_zones_may_not_claim_one_source_and_the_error_names_both(tmp_path: Path) -> None:
    zone_of("first_claim", source=str(tmp_path), destination="claims/first")
    with pytest.raises(SettingsError, match="'first_claim' and 'second_claim' claim the same source"):
        zone_of("second_claim", source=str(tmp_path / "inside"), destination="claims/second")


def test_two_zones_may_not_land_in_one_destination_and_the_error_names_both(tmp_path: Path) -> None:
    zone_of("first_lands", source=str(tmp_path / "a"), destination="landing/shared")
    for inside in ("landing/shared", "landing/shared/deeper", "landing"):
        with pytest.raises(SettingsError, match="'first_lands' and 'second_lands' land in the same destination"):
            zone_of("second_lands", source=str(tmp_path / "b"), destination=inside)
    zone_of("second_lands", source=str(tmp_path / "b"), destination="landing/shared-not")  # a sibling, not inside
    zone_of("unset_first", source=str(tmp_path / "c"))  # S3_PREFIX, beside the default zone
    with pytest.raises(SettingsError, match="'unset_first' and 'unset_second' land in the same destination"):
        zone_of("unset_second", source=str(tmp_path / "d"))


@pytest.mark.parametrize(
    ("attribute", "message"),
    [
        ("after_success: remove", "'remove' must be keep, delete or move:"),
        ('after_success: "move:"', "'move:' must be keep, delete or move:"),
        ("chunk_size: 0", "greater than 0"),
        ("priority: 500", "less than or equal to 100"),
        ('include: ["*.{csv,tsv}"]', "is not glob syntax here"),
        ('exclude: ["/srv/drop/*.tmp"]', "never an absolute path"),
        ('include: [""]', "an empty glob matches no file"),
        ('include: ["../*.csv"]', "has no '..'"),
        ("chunksize: 10", "chunksize"),
    ],
)
def test_a_zone_with_a_bad_attribute_is_refused_where_it_is_declared_naming_it(
    tmp_path: Path, attribute: str, message: str
) -> None:
    """Refused when the definitions load (`dg check defs`), not at every tick of its sensor."""
    name = unique("bad")
    (tmp_path / name).mkdir()
    (tmp_path / name / "defs.yaml").write_text(
        f"type: s3proc_dagster.LandingZone\nattributes:\n  source: {tmp_path / 'in'}\n  destination: {name}\n  {attribute}\n"
    )
    with pytest.raises(SettingsError, match=rf"landing zone '{name}' \({tmp_path / name / 'defs.yaml'}") as refused:
        zones_in(tmp_path, ROOT)
    assert message in str(refused.value)


def test_relative_directories_of_a_zone_are_below_the_project_wherever_it_is_loaded(tmp_path: Path) -> None:
    relative = LandingZone.model_validate(
        {"source": "data/partner", "rules": "dbt_like_sql/validations", "after_success": "move:data/done"}
    ).zone_settings("rel", tmp_path)
    assert relative["WATCH_PATH"] == str(tmp_path / "data" / "partner")
    assert relative["VALIDATION_RULES_DIR"] == str(tmp_path / "dbt_like_sql" / "validations")
    assert relative["ZONE_AFTER_SUCCESS"] == f"move:{tmp_path / 'data' / 'done'}"
    written = LandingZone.model_validate({"source": "/srv/drop", "after_success": "move:s3://b/done"})
    as_written = written.zone_settings("abs", tmp_path)
    assert (as_written["WATCH_PATH"], as_written["ZONE_AFTER_SUCCESS"]) == ("/srv/drop", "move:s3://b/done")


def test_a_zones_folder_with_a_file_of_another_type_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / "defs.yaml").write_text("type: s3proc_dagster.LandingZon\nattributes:\n  source: /srv/x\n")
    with pytest.raises(SettingsError, match=r"landing zone 'typo' .*type is 's3proc_dagster.LandingZon'"):
        zones_in(tmp_path, ROOT)


def test_a_zone_may_not_move_its_landed_files_into_a_watched_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"'loops' moves landed files to .*which zone 'loops' watches"):
        zone_of(
            "loops",
            source=str(tmp_path / "in"),
            destination="moves/loops",
            after_success=f"move:{tmp_path / 'in' / 'done'}",
        )
    zone_of("watched", source=str(tmp_path / "other"), destination="moves/watched")
    with pytest.raises(SettingsError, match="which zone 'watched' watches"):
        zone_of(
            "feeds",
            source=str(tmp_path / "feeds"),
            destination="moves/feeds",
            after_success=f"move:{tmp_path / 'other'}",
        )
    with pytest.raises(SettingsError, match="a directory source moves to a directory"):
        zone_of(
            "crosses",
            source=str(tmp_path / "crosses"),
            destination="moves/crosses",
            after_success="move:s3://bucket/done",
        )
    zone_of(
        "moves_aside",
        source=str(tmp_path / "aside"),
        destination="moves/aside",
        after_success=f"move:{tmp_path / 'done'}",
    )
    # declared first, it moved its files into the source of a zone declared after it: accepted
    zone_of(
        "early", source="s3://moves-test/early", destination="moves/early", after_success="move:s3://moves-test/late/x"
    )
    with pytest.raises(SettingsError, match="'early' moves landed files to s3://moves-test/late/x, which zone 'late'"):
        zone_of("late", source="s3://moves-test/late", destination="moves/late")
    # SeaweedFS reads `\` as `/`: this target is a folder of the zone's own source
    with pytest.raises(SettingsError, match=r"'slash' moves landed files to .*which zone 'slash' watches"):
        zone_of(
            "slash",
            source="s3://moves-test/slash",
            destination="moves/slash",
            after_success="move:s3://moves-test/slash\\done",
        )


def test_a_zone_inside_watch_path_is_its_own_sensors_alone_even_when_a_file_is_requeued(
    deployment: Deployment,
) -> None:
    folder = unique("zone_in_watch")
    zone = zone_of(folder, source=str(deployment.watch / folder), destination=f"{folder}/out")
    write_csv(deployment.watch / folder / "a.csv", promo_rows(5))
    assert run_requests_under(sensor_tick(deployment), folder) == []  # the default zone's sensor
    (request,) = tick(deployment, zone)
    assert request.tags["s3proc/zone"] == folder
    assert execute(request, deployment).success
    store = deployment.store()
    record = store.get(make_file_id("a.csv", folder))
    store.reset_to_pending(record.file_id, None)  # as `s3proc retry --force` does
    assert run_requests_under(sensor_tick(deployment), folder) == []
    (again,) = tick(deployment, zone)
    assert again.tags["s3proc/zone"] == folder and again.run_config["ops"]["checksum_calculation"]["config"]["zone"]


def test_a_zone_without_a_source_is_refused_naming_it() -> None:
    """It watched WATCH_PATH beside the default zone's sensor, so every file landed twice."""
    with pytest.raises(SettingsError, match="landing zone 'no_source' has no source"):
        LandingZone.model_validate({"destination": "no/source"}).definitions("no_source", ROOT)


@pytest.mark.parametrize("where", ["is", "holds"])
def test_a_zone_whose_source_is_or_holds_watch_path_takes_its_files_alone_and_leaves_parked_ones(
    deployment: Deployment, tmp_path: Path, where: str
) -> None:
    drop = tmp_path / "drop"
    watch = drop if where == "is" else drop / "incoming"
    errors = drop / "errors"  # the deployment's error directory, inside the zone's source
    zone = zone_of(unique(f"{where}_watch"), source=str(drop), destination=f"{where}-watch/out")
    write_text(watch / "day1" / "a.csv", "id\n1\n")
    write_text(errors / "parked.csv", "id\n2\n")  # a default-zone file parked there
    settings = {"WATCH_PATH": str(watch), "ERROR_DIRECTORY": str(errors)}
    with dg.build_sensor_context(
        instance=deployment.instance(), resources=resources_for(Settings(overrides=settings))
    ) as context:
        default = definitions().resolve_sensor_def("watch_directory_sensor").evaluate_tick(context)
    assert [r for r in default.run_requests or [] if "s3proc/path" in r.tags] == []
    requested = [r.tags["s3proc/path"] for r in tick(deployment, zone, **settings)]
    assert requested == [("" if where == "is" else "incoming/") + "day1/a.csv"]


def test_lineage_columns_give_each_row_its_source_and_index_matching_the_chunks_offsets(
    deployment: Deployment, tmp_path: Path
) -> None:
    drop = tmp_path / "lineage"
    src = write_csv(drop / "big.csv", promo_rows(120_001, seed=5))
    zone = zone_of(unique("lineage"), source=str(drop), destination="lineage/out", lineage_columns=True)
    (request,) = tick(deployment, zone)
    assert execute(request, deployment).success
    store = deployment.store()
    record = store.get(make_file_id("big.csv", zone.name))
    manifest = read_manifest(deployment.s3.client(), deployment.s3.bucket, "lineage/out/big.csv")
    client = deployment.s3.client()
    for chunk in store.list_chunks(record.file_id):
        local = tmp_path / f"part-{chunk.chunk_index}.parquet"
        client.download_file(deployment.s3.bucket, chunk.s3_key, str(local))
        rows = duckdb.sql(
            f"SELECT min(_source_row), max(_source_row), count(*), count(DISTINCT _source_row), "
            f"any_value(_source_file), any_value(_file_sha256) FROM read_parquet('{local}')"
        ).fetchall()
        assert rows == [
            (chunk.start_offset, chunk.end_offset, chunk.record_count, chunk.record_count, "big.csv", sha256_file(src))
        ]
    assert manifest.total_rows == 120_001


def test_a_default_zone_file_has_no_lineage_columns(deployment: Deployment, tmp_path: Path) -> None:
    from s3proc_dagster_tests.pipeline_helpers import run_requests_under, sensor_tick

    write_csv(deployment.watch / "plain-zone" / "p.csv", promo_rows(10))
    (request,) = run_requests_under(sensor_tick(deployment), "plain-zone")
    assert execute(request, deployment).success
    (part,) = [k for k in list_keys(deployment, f"{deployment.prefix}/plain-zone/p.csv/") if k.endswith(".parquet")]
    local = tmp_path / "p.parquet"
    deployment.s3.client().download_file(deployment.s3.bucket, part, str(local))
    columns = [row[0] for row in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{local}')").fetchall()]
    assert not [c for c in columns if c.startswith("_source") or c in ("_file_sha256", "_landed_at")]


def test_a_file_whose_output_would_land_in_a_zones_s3_source_is_failed_and_that_zone_never_takes_it(
    deployment: Deployment,
) -> None:
    folder = unique("watched_out")
    source = f"s3://{deployment.s3.bucket}/{deployment.prefix}/{folder}"
    zone = zone_of(folder, source=source, destination=f"{folder}/out", after_success="delete")
    write_text(deployment.watch / folder / "blob.bin", "opaque bytes")  # the default zone's file
    (request,) = run_requests_under(sensor_tick(deployment), folder)
    execute(request, deployment)
    record = deployment.store().get(make_file_id(f"{folder}/blob.bin"))
    assert record.status is S.FAILED and f"S3 source of landing zone {folder!r}" in record.error_details
    assert list_keys(deployment, f"{deployment.prefix}/{folder}/") == []  # nothing for the zone to take in
    assert tick(deployment, zone) == []
    bucket = deployment.s3.bucket
    assert watched_below(bucket, deployment.prefix).get(folder) == folder  # the folder the default zone may not use
    assert watched_below(bucket, f"{deployment.prefix}/{folder}/deeper") == {"": folder}  # all of a destination
    assert folder not in watched_below(bucket, deployment.prefix, folder).values()  # its own: a reserved folder
    assert watched_below(bucket, f"{folder}/out") == {} and watched_below("another-bucket", deployment.prefix) == {}


@pytest.mark.parametrize("action", ["delete", "move"])
def test_after_success_acts_on_the_original_only_once_committed_and_never_on_a_failed_file(
    deployment: Deployment, tmp_path: Path, action: str
) -> None:
    drop, done = tmp_path / "drop", tmp_path / "done"
    good = write_csv(drop / "good.csv", promo_rows(8))
    bad = drop / "bad.zip"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("not a zip")
    setting = "delete" if action == "delete" else f"move:{done}"
    zone = zone_of(unique("after"), source=str(drop), destination=f"after/{action}", after_success=setting)
    requests = tick(deployment, zone)
    assert len(requests) == 2
    for request in requests:
        execute(request, deployment)
    store = deployment.store()
    record = store.get(make_file_id("good.csv", zone.name))
    assert record.status is S.COMPLETED
    assert not good.exists()
    if action == "move":
        assert (done / "good.csv").read_bytes() == csv_bytes(promo_rows(8))
        assert record.after_success == f"moved to {done / 'good.csv'}"
    else:
        assert record.after_success == "deleted"
    failed = store.get(make_file_id("bad.zip", zone.name))
    assert failed.status is S.FAILED and failed.after_success is None
    assert not (done / "bad.zip").exists()  # parked in the error directory, as always, not moved
    parked = Path(deployment.env["ERROR_DIRECTORY"]) / zone.name / "bad.zip"
    assert parked.read_text() == "not a zip"


def test_a_zones_failed_file_never_replaces_a_default_zone_file_parked_at_the_same_path(
    deployment: Deployment, tmp_path: Path
) -> None:
    """ERROR_DIRECTORY/<zone name>/ is also where the default zone parks its folder of that name."""
    name = unique("parks")
    zone = zone_of(name, source=str(tmp_path / "drop"), destination=f"{name}/out")
    write_text(deployment.watch / name / "bad.zip", "the default zone's, not a zip")
    (request,) = run_requests_under(sensor_tick(deployment), name)
    execute(request, deployment)
    parked = Path(deployment.env["ERROR_DIRECTORY"]) / name / "bad.zip"
    assert parked.read_text() == "the default zone's, not a zip"
    theirs = write_text(tmp_path / "drop" / "bad.zip", "the zone's, not a zip either")
    (request,) = tick(deployment, zone)
    execute(request, deployment)
    assert parked.read_text() == "the default zone's, not a zip"  # replaced, it was lost
    record = deployment.store().get(make_file_id("bad.zip", name))
    assert record.status is S.FAILED and "holds another file's parked original" in record.error_details
    assert theirs.read_text() == "the zone's, not a zip either"  # left where it was


@pytest.mark.parametrize("action", ["delete", "move"])
def test_the_same_file_dropped_again_is_skipped_and_deleted_or_moved_like_the_first(
    deployment: Deployment, tmp_path: Path, action: str
) -> None:
    drop, done = tmp_path / "again", tmp_path / "again-done"
    setting = "delete" if action == "delete" else f"move:{done}"
    zone = zone_of(unique("again"), source=str(drop), destination=f"again/{action}", after_success=setting)
    content = csv_bytes(promo_rows(6))
    for _ in range(2):  # a producer sending the same file twice
        (drop / "day").mkdir(parents=True, exist_ok=True)
        (drop / "day" / "a.csv").write_bytes(content)
        (request,) = tick(deployment, zone)
        assert execute(request, deployment).success
        assert not (drop / "day" / "a.csv").exists()
    record = deployment.store().get(make_file_id("day/a.csv", zone.name))
    assert record.status is S.COMPLETED
    if action == "move":
        beside = done / "day" / f"a.v-{record.checksum[:16]}.csv"
        assert record.after_success == f"moved to {beside}" and beside.read_bytes() == content
    else:
        assert record.after_success == "deleted"


@pytest.mark.parametrize("action", ["delete", "move"])
def test_the_same_object_uploaded_again_is_skipped_and_deleted_or_moved_like_the_first(
    deployment: Deployment, action: str
) -> None:
    folder = unique(f"again_s3_{action}")
    done = f"{folder}-done"
    zone = zone_of(
        folder,
        source=f"s3://{deployment.s3.bucket}/{deployment.prefix}/{folder}-in",
        destination=f"{folder}/out",
        after_success="delete" if action == "delete" else f"move:s3://{deployment.s3.bucket}/{done}",
    )
    client, key, content = (
        deployment.s3.client(),
        f"{deployment.prefix}/{folder}-in/day/a.csv",
        csv_bytes(promo_rows(6)),
    )

    def upload_and_land(after: float) -> float:
        """The export uploaded (one ETag every time) in a second later than `after`: S3 tells
        uploads apart by LastModified, in whole seconds. Its run; its LastModified."""
        wait_for(lambda: int(time.time()) > int(after), "the next second", timeout=5)
        client.put_object(Bucket=deployment.s3.bucket, Key=key, Body=content)
        uploaded = client.head_object(Bucket=deployment.s3.bucket, Key=key)["LastModified"].timestamp()
        requests: list[dg.RunRequest] = []
        wait_for(lambda: requests.extend(tick(deployment, zone)) or requests, "the zone's request for the upload")
        (request,) = requests
        assert execute(request, deployment).success
        assert list_keys(deployment, key) == []  # gone from the source once its output was proven in S3
        return uploaded

    upload_and_land(upload_and_land(0.0))  # a producer uploading the same export twice
    record = deployment.store().get(make_file_id("day/a.csv", zone.name))
    if action == "delete":
        assert record.status is S.COMPLETED and record.after_success == "deleted"
        return
    beside = f"{done}/day/a.v-{record.checksum[:16]}.csv"  # the first copy kept; its path below the source
    assert record.status is S.COMPLETED and record.after_success == f"moved to s3://{deployment.s3.bucket}/{beside}"
    moved = list_keys(deployment, f"{done}/")
    assert moved == sorted([f"{done}/day/a.csv", beside])
    for moved_key in moved:
        assert client.get_object(Bucket=deployment.s3.bucket, Key=moved_key)["Body"].read() == content


@pytest.mark.parametrize("action", ["delete", "move"])
def test_an_object_overwritten_in_the_second_its_run_began_is_never_deleted_or_moved_for_the_old_version(
    deployment: Deployment, action: str
) -> None:
    folder = unique(f"overwrite_{action}")
    source, done = f"s3://{deployment.s3.bucket}/{deployment.prefix}/{folder}-in", f"{folder}-done"
    zone = zone_of(folder, source=source, destination=f"{folder}/out")  # keep: the action comes below
    client, key = deployment.s3.client(), f"{deployment.prefix}/{folder}-in/a.csv"
    first = csv_bytes(promo_rows(6, seed=1))
    client.put_object(Bucket=deployment.s3.bucket, Key=key, Body=first)
    requests: list[dg.RunRequest] = []
    wait_for(lambda: requests.extend(tick(deployment, zone)) or requests, "the zone's request for the upload")
    assert execute(requests[0], deployment).success
    newer = first.replace(b",", b";", 1)  # other bytes, the same size
    assert len(newer) == len(first) and newer != first
    client.put_object(Bucket=deployment.s3.bucket, Key=key, Body=newer)
    store, file_id = deployment.store(), make_file_id("a.csv", zone.name)
    # the overwrite landed within the second the version's run began: S3's whole-second
    # LastModified cannot tell it from the object that run read
    written = client.head_object(Bucket=deployment.s3.bucket, Key=key)["LastModified"]
    setting = "delete" if action == "delete" else f"move:s3://{deployment.s3.bucket}/{done}"
    store.update_file(
        file_id, processing_started_at=written + timedelta(seconds=1), after_success=f"{setting} (pending)"
    )
    after_success.finish_pending(store, client, deployment.s3.bucket, ())
    outcome = store.get(file_id).after_success
    assert outcome.startswith(f"not {action}d:") and "another version's bytes" in outcome, outcome
    assert client.get_object(Bucket=deployment.s3.bucket, Key=key)["Body"].read() == newer  # its own run is next
    assert list_keys(deployment, f"{done}/") == []


def test_a_move_never_replaces_an_earlier_version_already_at_its_target(deployment: Deployment, tmp_path: Path) -> None:
    drop, done = tmp_path / "daily", tmp_path / "daily-done"
    zone = zone_of(unique("daily"), source=str(drop), destination="daily/out", after_success=f"move:{done}")
    first, second = csv_bytes(promo_rows(5)), csv_bytes(promo_rows(7, seed=2))
    for content in (first, second):  # the same name dropped on two days
        (drop / "daily.csv").parent.mkdir(exist_ok=True)
        (drop / "daily.csv").write_bytes(content)
        (request,) = tick(deployment, zone)
        assert execute(request, deployment).success
    record = deployment.store().get(make_file_id("daily.csv", zone.name))
    beside = done / f"daily.v-{record.checksum[:16]}.csv"
    assert record.status is S.COMPLETED and record.after_success == f"moved to {beside}"
    assert (done / "daily.csv").read_bytes() == first and beside.read_bytes() == second
    assert not (drop / "daily.csv").exists()


def test_a_crash_between_the_commit_and_the_action_is_finished_by_recovery(
    deployment: Deployment, tmp_path: Path
) -> None:

    drop = tmp_path / "crash-after"
    src = write_csv(drop / "c.csv", promo_rows(8))
    zone = zone_of(unique("crash_after"), source=str(drop), destination="crash/after", after_success="delete")
    (request,) = tick(deployment, zone)
    assert execute(request, deployment).success
    store = deployment.store()
    record = store.get(make_file_id("c.csv", zone.name))
    # as if the worker died right after the COMPLETED write: the action still pending, the file back
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(csv_bytes(promo_rows(8)))
    store.update_file(record.file_id, after_success="delete (pending)")
    assert reconcile(deployment).success
    assert not src.exists()
    assert store.get(record.file_id).after_success == "deleted"
    # a newer version at that path is never deleted for the old one
    newer = write_csv(src, promo_rows(9))
    store.update_file(record.file_id, after_success="delete (pending)")
    assert reconcile(deployment).success
    assert newer.exists() and "newer version" in store.get(record.file_id).after_success


def test_a_retyped_column_is_reported_by_the_check_and_blocking_fails_the_file_before_it_lands(
    deployment: Deployment, tmp_path: Path
) -> None:
    drop = tmp_path / "drift"
    zone = zone_of(unique("drift"), source=str(drop), destination="drift/out")
    write_text(drop / "a.csv", "id,amount\n1,10\n2,20\n")
    (first,) = tick(deployment, zone)
    assert execute(first, deployment).success
    write_text(drop / "b.csv", "id,amount\n1,ten\n2,twenty\n")
    (second,) = tick(deployment, zone)
    result = execute(second, deployment)
    assert result.success  # warn: the file lands, the check says how it differs
    (evaluation,) = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == "schema_drift"
    ]
    assert not evaluation.passed and "retyped amount: BIGINT -> VARCHAR" in evaluation.description

    blocking = zone_of(
        unique("drift_block"), source=str(tmp_path / "block"), destination="drift/block", schema_drift="blocking"
    )
    write_text(tmp_path / "block" / "a.csv", "id,amount\n1,10\n")
    (first,) = tick(deployment, blocking)
    assert execute(first, deployment).success
    write_text(tmp_path / "block" / "b.csv", "id,amount,extra\n1,x,y\n")
    (second,) = tick(deployment, blocking)
    blocked = execute(second, deployment)
    assert not blocked.success
    checks = {
        e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data
        for e in deployment.instance().all_logs(blocked.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    }  # a file of its own run, whose step fails: its checks are stored all the same
    assert not checks["landed"].passed and checks["landed"].partition == "b.csv"
    assert not checks["schema_drift"].passed and "added extra (VARCHAR)" in checks["schema_drift"].description
    record = deployment.store().get(make_file_id("b.csv", blocking.name))
    assert record.status is S.FAILED and "added extra (VARCHAR)" in record.error_details
    assert "retyped amount: BIGINT -> VARCHAR" in record.error_details
    assert list_keys(deployment, "drift/block/b.csv/") == []  # nothing landed
    # run again from the UI, the check says what its landing run said, not "not landed yet"
    again = _schema_result(deployment.instance(), zone_asset_key(blocking.name), "b.csv", record)
    assert not again.passed and "added extra (VARCHAR)" in (again.description or "")


def test_drift_compares_with_the_last_landed_table_not_a_plain_object_or_a_header_alone(
    deployment: Deployment, tmp_path: Path
) -> None:
    drop = tmp_path / "mixed"
    zone = zone_of(unique("mixed"), source=str(drop), destination="mixed/out", schema_drift="blocking")

    def land(name: str, text: str) -> dg.ExecuteJobResult:
        write_text(drop / name, text)
        (request,) = tick(deployment, zone)
        return execute(request, deployment)

    assert land("a.csv", "id,amount\n1,10\n").success
    assert land("photo.bin", "not a table").success  # a landing without columns
    assert not land("b.csv", "id,amount\n1,ten\n").success  # still compared with a.csv: blocked
    record = deployment.store().get(make_file_id("b.csv", zone.name))
    assert record.status is S.FAILED and "retyped amount: BIGINT -> VARCHAR" in record.error_details
    assert land("empty.csv", "id,amount\n").success  # a header alone: its VARCHARs are no retyping
    assert land("c.csv", "id,amount\n2,20\n").success  # nor the columns the next file is held to
    assert not land("d.csv", "id\n3\n").success  # a header alone, or not, still names its columns


GRAPHQL_ASSET = """
query Asset($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode { groupName description kinds isPartitioned hasAssetChecks isExecutable isMaterializable
      assetMaterializations(limit: 5) { partition metadataEntries { label ... on TableMetadataEntry { table { records } } } } }
  }
}
"""


def declare_in(folder: Path, attributes: str) -> None:
    """A zone's defs.yaml in `folder`, its attributes as YAML lines."""
    folder.mkdir(parents=True)
    (folder / "defs.yaml").write_text(f"type: s3proc_dagster.LandingZone\nattributes:\n{attributes}")


def test_a_zone_is_a_defined_asset_in_the_catalog_with_its_chunks_and_its_failures(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    name, zones = unique("catalog"), tmp_path / "zones"
    drop = tmp_path / "catalog-drop"
    declare_in(
        zones / name,
        f"  source: {drop}\n  destination: catalog/out\n  chunk_size: 30\n  group: partners\n"
        "  description: Orders from the partner's SFTP drop.\n  owners: [team:data-platform]\n",
    )
    drop.mkdir()
    on_demand, on_demand_drop = f"{name}_od", tmp_path / "on-demand-drop"  # landed from the catalog only
    declare_in(
        zones / on_demand,
        f"  source: {on_demand_drop}\n  destination: on_demand/out\n  chunk_size: 25\n  enabled: false\n"
        "  exclude: ['**/skip_*']\n",
    )
    write_csv(on_demand_drop / "picked.csv", promo_rows(40, seed=3))
    write_csv(on_demand_drop / "skip_me.csv", promo_rows(5, seed=4))
    monkeypatch.setenv("S3PROC_ZONES_DIR", str(zones))
    ui = request.getfixturevalue("dagster_dev")
    instance = deployment.instance()
    # IGNORE_INITIAL: the zone sensor's first tick takes what is there as seen
    wait_for(lambda: watch_sensor_cursor(instance, f"{name}_zone_sensor"), "the zone sensor's first tick", timeout=180)
    write_csv(drop / "orders.csv", promo_rows(70, seed=8))
    (drop / "broken.zip").write_text("not a zip")
    store = deployment.store()

    def settled() -> bool:
        records = [store.get(make_file_id(p, name)) for p in ("orders.csv", "broken.zip")]
        return all(r is not None and r.status in (S.COMPLETED, S.FAILED) for r in records)

    wait_for(settled, "the zone's files", timeout=300)
    node = graphql(ui, GRAPHQL_ASSET, {"key": {"path": ["zones", name]}})["assetNodeOrError"]
    assert node["groupName"] == "partners" and node["description"] == "Orders from the partner's SFTP drop."
    assert set(node["kinds"]) >= {"s3", "parquet"} and node["isPartitioned"] and node["hasAssetChecks"]
    (landing,) = [m for m in node["assetMaterializations"] if m["partition"] == "orders.csv"]
    (table,) = [e for e in landing["metadataEntries"] if e["label"] == "chunk_list"]
    chunks = [json.loads(r) for r in table["table"]["records"]]
    assert [(c["chunk"], c["rows"], c["first_record"], c["last_record"]) for c in chunks] == [
        (0, 30, 0, 29),
        (1, 30, 30, 59),
        (2, 10, 60, 69),
    ]
    evaluations = [
        e.dagster_event.event_specific_data
        for e in instance.all_logs(store.get(make_file_id("broken.zip", name)).run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert [(ev.partition, ev.passed) for ev in evaluations] == [("broken.zip", False)]
    assert "not a zip archive" in evaluations[0].description
    assert node["isExecutable"] and node["isMaterializable"]  # no "External Asset" page

    # Materialize of a partition in the catalog, as the UI launches it: that file lands by
    # its zone's rules in a run of Dagster's asset job; a file no longer there fails alone
    instance.add_dynamic_partitions(f"s3proc_zone_{on_demand}", ["picked.csv", "gone.csv", "skip_me.csv"])
    landed = materialize(ui, ["zones", on_demand], "picked.csv")
    gone = materialize(ui, ["zones", on_demand], "gone.csv")
    left_out = materialize(ui, ["zones", on_demand], "skip_me.csv")  # a path its globs leave out
    for run_id in (landed, gone, left_out):
        wait_for(lambda run_id=run_id: instance.get_run_by_id(run_id).is_finished, f"run {run_id}", timeout=300)
    assert instance.get_run_by_id(landed).status is dg.DagsterRunStatus.SUCCESS
    record = store.get(make_file_id("picked.csv", on_demand))
    assert record is not None and record.status is S.COMPLETED and record.run_id == landed
    assert instance.get_run_by_id(landed).tags["s3proc/zone"] == on_demand  # found by its zone like a sensor's run
    rows = read_dataset(deployment, "on_demand/out/picked.csv", tmp_path)
    assert rows == source_rows(on_demand_drop / "picked.csv", "read_csv")
    materialized = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["zones", on_demand]), asset_partitions=["picked.csv"]), limit=5
    ).records
    assert [m.run_id for m in materialized] == [landed]  # the file's own, not a second one from Dagster
    checks = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(["zones", on_demand]), "landed"), limit=5
    )
    assert [(c.run_id, c.status.value) for c in checks if c.partition == "picked.csv"] == [(landed, "SUCCEEDED")]
    assert "gone.csv is no longer at" in failed_run_reason(instance, gone)
    assert instance.get_run_by_id(gone).tags["s3proc/zone"] == on_demand
    assert store.get(make_file_id("gone.csv", on_demand)) is None  # nothing recorded, nothing parked
    assert "skip_me.csv is left out by its include" in failed_run_reason(instance, left_out)
    assert store.get(make_file_id("skip_me.csv", on_demand)) is None and (on_demand_drop / "skip_me.csv").exists()


def failed_run_reason(instance: dg.DagsterInstance, run_id: str) -> str:
    """The reason of a FAILURE run's one failed step."""
    assert instance.get_run_by_id(run_id).status is dg.DagsterRunStatus.FAILURE
    (failure,) = [
        e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.is_step_failure
    ]
    return failure.step_failure_data.user_failure_data.description


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on InvalidSubsetError { message }
  }
}
"""


def materialize(ui: str, key: list[str], partition: str) -> str:
    """What the catalog's Materialize sends for one partition of an asset: its run id."""
    (location,) = graphql(ui, "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }", {})[
        "workspaceOrError"
    ]["locationEntries"]
    params = {
        "selector": {
            "repositoryLocationName": location["name"],
            "repositoryName": "__repository__",
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [{"path": key}],  # and its checks, as the UI selects them
            "assetCheckSelection": [{"assetKey": {"path": key}, "name": c} for c in ("landed", "schema_drift")],
        },
        "runConfigData": {},
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
    }
    launched = graphql(ui, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


@pytest.mark.servers  # Dagster's CLI (dg) in subprocesses, with no setting in their environment, 10-20 s
def test_dg_lists_the_component_scaffolds_a_zone_and_checks_the_definitions(tmp_path: Path) -> None:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}  # no setting, no secret
    dg_cli = str(Path(sys.executable).parent / "dg")
    listed = subprocess.run(
        [dg_cli, "list", "components"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0 and "s3proc_dagster.LandingZone" in listed.stdout, listed.stderr[-2000:]
    checked = subprocess.run([dg_cli, "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]  # no zone declared
    scaffolded = ROOT / "s3proc_dagster" / "defs" / "zones" / unique("scaffolded")
    second_name = unique("second")
    try:
        done = subprocess.run(
            [dg_cli, "scaffold", "defs", "s3proc_dagster.LandingZone", f"zones/{scaffolded.name}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        text = (scaffolded / "defs.yaml").read_text()
        assert text.startswith("type: s3proc_dagster.LandingZone") and "# after_success: keep, delete, or move:" in text
        (tmp_path / "data" / "partner_orders").mkdir(parents=True)
        second = ROOT / "s3proc_dagster" / "defs" / "zones" / second_name
        second.mkdir()
        (second / "defs.yaml").write_text(
            f"type: s3proc_dagster.LandingZone\nattributes:\n  source: s3://bucket/{second.name}\n"
        )
        text = text.replace("source: data/partner_orders", f"source: {tmp_path / 'data' / 'partner_orders'}")
        (scaffolded / "defs.yaml").write_text(text)
        two = subprocess.run([dg_cli, "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
        listed = subprocess.run(
            [dg_cli, "list", "defs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert f"{scaffolded.name}_zone_sensor" in listed.stdout and f"{second.name}_zone_sensor" in listed.stdout
    finally:  # only what this test made: a zone someone declared there stays
        for made in (scaffolded, ROOT / "s3proc_dagster" / "defs" / "zones" / second_name):
            shutil.rmtree(made, ignore_errors=True)
        with contextlib.suppress(OSError):
            (ROOT / "s3proc_dagster" / "defs" / "zones").rmdir()  # when empty


def test_a_zones_files_cost_the_documented_event_rows_plus_their_two_checks(
    deployment: Deployment, tmp_path: Path
) -> None:
    drop = tmp_path / "rows"
    zone = zone_of(unique("rows"), source=str(drop), destination="rows/out")
    files = [write_csv(drop / f"r{i}.csv", promo_rows(10, seed=i)) for i in range(30)]
    (batch,) = tick(deployment, zone, BATCH_FILES="true", MAX_CONCURRENCY="1")
    result = batch_run(deployment, batch)
    assert result.success
    per_file = event_rows(deployment, result.run_id) / len(files)
    write_csv(drop / "one.csv", promo_rows(10))
    (single,) = tick(deployment, zone)
    alone = execute(single, deployment)
    # a materialization and two check evaluations (`landed`, `schema_drift`) a file, where the
    # default zone has one materialization: docs/zones.md measures it (4.5 rows a file)
    assert per_file <= BATCH_ROWS_PER_FILE + 1
    assert alone.success and event_rows(deployment, alone.run_id) <= SINGLE_RUN_ROWS + 2
