"""The `s3proc` commands on a declared landing zone's files, run as a user runs them: the
zone declared in a `defs.yaml` under S3PROC_ZONES_DIR, each command a subprocess that
loads the code location's definitions and so finds the zone as the sensors do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from benchmarks.support import Deployment, csv_bytes, list_keys, promo_rows, write_csv
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.models import make_file_id
from s3proc_dagster.settings import zone_overrides
from s3proc_dagster_tests.pipeline_helpers import execute
from s3proc_dagster_tests.test_s3_incoming import put
from s3proc_dagster_tests.test_zones import tick, zone_of


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
def zones_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """S3PROC_ZONES_DIR for this test's commands: the folder a deployment declares zones in."""
    folder = tmp_path / "zones"
    folder.mkdir()
    monkeypatch.setenv("S3PROC_ZONES_DIR", str(folder))
    return folder


def declare(zones_dir: Path, name: str, **attributes: object) -> None:
    """A zone as a user declares it: `<S3PROC_ZONES_DIR>/<name>/defs.yaml`."""
    lines = ["type: s3proc_dagster.LandingZone", "attributes:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in attributes.items()]
    (zones_dir / name).mkdir()
    (zones_dir / name / "defs.yaml").write_text("\n".join(lines) + "\n")


def failed_by_its_sensor(deployment: Deployment, zones_dir: Path, name: str, src: Path, **attributes: object) -> Path:
    """`src`, not a zip, run as the zone's sensor runs it (not through the CLI, so a command
    under test does not also make its own input); where the failed file was parked."""
    declare(zones_dir, name, **attributes)
    zone = zone_of(name, **attributes)  # this process's view of the same defs.yaml
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("not a zip")
    (request,) = [r for r in tick(deployment, zone) if r.tags["s3proc/source"] == str(src)]
    assert not execute(request, deployment).success
    return deployment.errors / name / src.relative_to(Path(str(attributes["source"])))


def s3proc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", *args],
        cwd=cwd,
        env=os.environ.copy(),  # the deployment's settings and instance, and S3PROC_ZONES_DIR
        capture_output=True,
        text=True,
        timeout=300,
    )


def docs(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_a_zone_keeps_its_failed_files_in_its_own_error_folder_unless_told_otherwise(tmp_path: Path) -> None:
    zone = {"ZONE_NAME": "partner", "WATCH_PATH": "/drop"}
    assert zone_overrides(zone, tmp_path)["ERROR_DIRECTORY"] == str(tmp_path / "partner")
    assert zone_overrides({**zone, "ERROR_DIRECTORY": "/elsewhere"}, tmp_path)["ERROR_DIRECTORY"] == "/elsewhere"
    assert "ERROR_DIRECTORY" not in zone_overrides({"CHUNK_SIZE": "5"}, tmp_path)  # the default zone's


def test_process_runs_a_zone_file_with_its_zone_settings_and_read_finds_it_by_its_zone_path(
    deployment: Deployment, zones_dir: Path, tmp_path: Path
) -> None:
    name = unique("cli_dir")
    drop = tmp_path / "drop"
    declare(zones_dir, name, source=str(drop), destination=f"{name}/out", chunk_size=7)
    src = write_csv(drop / "day1" / "orders.csv", promo_rows(20, seed=11))

    done = s3proc("process", str(src), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"COMPLETED -> {name}/out/day1/orders.csv  {src}"), done.stdout

    record = deployment.store().get(make_file_id("day1/orders.csv", name))  # the zone's file id
    assert record is not None and record.status is S.COMPLETED
    assert record.output_key == f"{name}/out/day1/orders.csv"
    assert [c.record_count for c in deployment.store().list_chunks(record.file_id)] == [7, 7, 6]
    run = deployment.instance().get_run_by_id(record.run_id)
    assert run.tags["s3proc/zone"] == name and run.tags["s3proc/file_id"] == record.file_id
    assert run.run_config["ops"]["checksum_calculation"]["config"]["zone"]["ZONE_NAME"] == name
    assert list_keys(deployment, f"{deployment.prefix}/orders.csv/") == []  # not the default zone's way

    read = s3proc("read", "day1/orders.csv", "--format", "jsonl", cwd=tmp_path)  # as the zone's run tags name it
    assert read.returncode == 0, read.stderr
    assert len(read.stdout.splitlines()) == 20


def test_process_leaves_a_file_its_zones_globs_leave_out_as_its_sensor_does(
    deployment: Deployment, zones_dir: Path, tmp_path: Path
) -> None:
    name = unique("cli_globs")
    drop = tmp_path / "drop"
    declare(zones_dir, name, source=str(drop), destination=f"{name}/out", include=["*.csv"])
    src = drop / "events.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text('{"a": 1}\n')
    done = s3proc("process", str(src), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    assert f"zone {name!r} leaves events.jsonl out (include ['*.csv']" in done.stderr
    assert deployment.store().get(make_file_id("events.jsonl", name)) is None
    assert src.exists() and list_keys(deployment, f"{name}/out/") == []


def test_process_runs_an_object_of_an_s3_zone_with_its_zone_settings(
    deployment: Deployment, zones_dir: Path, tmp_path: Path
) -> None:
    name = unique("cli_s3")
    prefix = f"zones-{uuid.uuid4().hex[:6]}/drop"
    declare(zones_dir, name, source=f"s3://{deployment.s3.bucket}/{prefix}", destination=f"{name}/out", chunk_size=9)
    rel = f"c-{name}/p.csv"
    put(deployment, f"{prefix}/{rel}", csv_bytes(promo_rows(10, seed=12)))
    uri = f"s3://{deployment.s3.bucket}/{prefix}/{rel}"

    done = s3proc("process", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    record = deployment.store().get(make_file_id(rel, name))
    assert record is not None and record.status is S.COMPLETED
    assert record.output_key == f"{name}/out/{rel}"
    assert [c.record_count for c in deployment.store().list_chunks(record.file_id)] == [9, 1]
    assert deployment.instance().get_run_by_id(record.run_id).tags["s3proc/zone"] == name

    (shown,) = docs(s3proc("status", rel, "--json", cwd=tmp_path))  # by its key below the zone's prefix
    assert shown["fileId"] == record.file_id and shown["zone"] == name
    assert [r["runId"] for r in shown["runs"]] == [record.run_id]  # found by the zone's run tag


def test_status_shows_a_failed_zone_file_in_its_zone_error_folder_and_retry_brings_it_back(
    deployment: Deployment, zones_dir: Path, tmp_path: Path
) -> None:
    name = unique("cli_fail")
    drop = tmp_path / "drop"
    rel = f"in-{name}/broken.zip"
    src = drop / rel
    parked = failed_by_its_sensor(deployment, zones_dir, name, src, source=str(drop), destination=f"{name}/out")
    file_id = make_file_id(rel, name)
    assert parked.read_text() == "not a zip" and not src.exists()

    (listed,) = [d for d in docs(s3proc("status", "--json", cwd=tmp_path)) if d["fileId"] == file_id]
    assert listed["status"] == "failed" and listed["parkedPath"] == str(parked) and listed["zone"] == name
    text = s3proc("status", cwd=tmp_path)
    (line,) = [x for x in text.stdout.splitlines() if str(src) in x]
    assert line.startswith("FAILED") and f"{parked}  [zone {name}]" in line and "not a zip archive" in line

    for spelling, cwd in ((rel, tmp_path), (str(parked), tmp_path), (f"{name}/{rel}", deployment.errors)):
        found = docs(s3proc("status", spelling, "--json", cwd=cwd))
        assert [d["fileId"] for d in found] == [file_id], spelling

    retried = s3proc("retry", rel, cwd=tmp_path)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert retried.stdout.startswith(f"PENDING    {src}  (was FAILED")
    assert src.read_text() == "not a zip" and not parked.exists()
    assert deployment.store().get(file_id).status is S.PENDING


def test_backfill_selects_the_zone_files_by_the_zone_rules_and_says_whose_they_are(
    deployment: Deployment, zones_dir: Path, tmp_path: Path
) -> None:
    name = unique("cli_fill")
    drop = tmp_path / "drop"
    folder = f"fill-{name}"
    broken = drop / folder / "broken.zip"
    attributes = {"source": str(drop), "destination": f"{name}/out", "exclude": ["**/*.tsv"]}
    parked = failed_by_its_sensor(deployment, zones_dir, name, broken, **attributes)
    assert parked.exists()
    wanted = write_csv(drop / folder / "a.csv", promo_rows(5))
    write_csv(drop / folder / "skipped.tsv", promo_rows(5), delimiter="\t")  # the zone's exclude glob

    everywhere = s3proc("backfill", "--glob", f"{folder}/*", "--dry-run", cwd=tmp_path)
    assert everywhere.returncode == 0, everywhere.stderr
    assert everywhere.stdout.splitlines() == [f"would queue  {wanted}  [zone {name}]", "1 file(s) selected"]

    failed = s3proc("backfill", "--status", "failed", "--zone", name, "--dry-run", cwd=tmp_path)
    assert failed.returncode == 0, failed.stderr
    assert failed.stdout.splitlines() == [
        f"would queue  {parked}  [zone {name}]  (FAILED: back to {broken} and PENDING first, as `s3proc retry`)",
        "1 file(s) selected",
    ]
    assert parked.exists()  # a dry run moves nothing

    unknown = s3proc("backfill", "--zone", f"{name}_not", "--dry-run", cwd=tmp_path)
    assert unknown.returncode == 2 and f"--zone {name}_not: no such landing zone" in unknown.stderr


def test_a_default_zone_file_is_shown_as_before_while_zones_are_declared(
    deployment: Deployment, zones_dir: Path, tmp_path: Path
) -> None:
    name = unique("cli_beside")
    declare(zones_dir, name, source=str(tmp_path / "drop"), destination=f"{name}/out")
    (tmp_path / "drop").mkdir()
    folder = f"plain-{name}"
    src = write_csv(deployment.watch / folder / "p.csv", promo_rows(4))
    done = s3proc("process", str(src), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    record = deployment.store().get(make_file_id(f"{folder}/p.csv"))  # the default zone's file id
    assert record is not None and record.output_key == f"{deployment.prefix}/{folder}/p.csv"
    assert "s3proc/zone" not in deployment.instance().get_run_by_id(record.run_id).tags
    (shown,) = docs(s3proc("status", f"{folder}/p.csv", "--json", cwd=tmp_path))
    assert shown["fileId"] == record.file_id and "zone" not in shown
    assert [r["runId"] for r in shown["runs"]] == [record.run_id]
    text = s3proc("status", f"{folder}/p.csv", cwd=tmp_path).stdout.splitlines()[0]
    assert text.endswith(f"chunks  {src}  ->  {record.output_key}")  # no zone marker
