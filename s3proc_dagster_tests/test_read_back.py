"""Reading the data back: `s3proc read` and the README's snippet, on files processed end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.support import HEADER, Deployment, csv_bytes, promo_rows, write_csv
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.transfer import read
from s3proc_dagster_tests.pipeline_helpers import execute, run_requests_under, sensor_tick, source_rows, write_zip

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "readback"
BAD_CODES = {3, 7}  # rows of promo_mixed.csv whose promoCode breaks invalidPromoCode


@dataclass(frozen=True)
class Landed:
    """The files `landed` processed, and where their outputs are."""

    flights: Path  # 60,000 records: two parts at the deployment's CHUNK_SIZE of 50,000
    promo: Path
    blob: bytes
    prefix: str  # the datasets' common key prefix, `<S3_PREFIX>/readback`

    def dataset(self, name: str) -> str:
        return f"{self.prefix}/{name}"


@pytest.fixture(scope="module")
def landed(deployment: Deployment) -> Landed:
    """Files dropped in the watched directory and processed as the sensor asks: a CSV of
    two parts, a validated CSV with rejected records, a non-tabular file and an archive."""
    w = deployment.watch / FOLDER
    flights = write_csv(w / "flights.csv", promo_rows(60_000, 71))
    mixed = promo_rows(30, 72)
    for i in BAD_CODES:
        mixed[i][1] = "bad"
    promo = write_csv(w / "promo_mixed.csv", mixed)
    blob = bytes(range(256)) * 300
    (w / "image.bin").write_bytes(blob)
    write_zip(w / "bundle.zip", {"inner.csv": csv_bytes(promo_rows(4, 73))})
    write_csv(w / "unmanifested.csv", promo_rows(5, 74))
    requests = run_requests_under(sensor_tick(deployment), FOLDER)
    assert len(requests) == 5
    for request in requests:
        assert execute(request, deployment).success, request.tags["s3proc/path"]
    return Landed(flights, promo, blob, f"{deployment.prefix}/{FOLDER}")


def s3proc_read(deployment: Deployment, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`s3proc read ARGS` as a user runs it, with the deployment's settings in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "read", *args],
        env={**os.environ, **deployment.env},
        cwd=cwd,
        capture_output=True,
        timeout=180,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error a failed read printed: exit status 1, nothing on stdout, one line on stderr."""
    assert result.returncode == 1, result.stderr.decode()
    assert result.stdout == b""
    text = result.stderr.decode()
    assert text.startswith("s3proc: ") and text.count("\n") == 1, text
    return text


def csv_rows(data: bytes, tmp_path: Path) -> list[tuple]:
    """CSV output typed as DuckDB types it, so it compares with `source_rows` of the source."""
    out = tmp_path / "printed.csv"
    out.write_bytes(data)
    return source_rows(out, "read_csv")


def test_read_prints_the_current_version_as_csv_equal_to_the_source_however_it_is_named(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    record = deployment.store().get_by_path(str(landed.flights))
    expected = source_rows(landed.flights, "read_csv")
    bucket = deployment.s3.bucket
    names = [
        f"{FOLDER}/flights.csv",  # relative to WATCH_PATH, as run tags show it
        record.file_id,
        f"s3://{bucket}/{landed.dataset('flights.csv')}/",  # the dataset itself
    ]
    for name in names:
        result = s3proc_read(deployment, name, cwd=tmp_path)
        assert result.returncode == 0, (name, result.stderr.decode())
        assert result.stdout.splitlines()[0].decode().replace('"', "") == ",".join(HEADER)
        assert csv_rows(result.stdout, tmp_path) == expected, name


def test_read_format_parts_lists_exactly_the_manifests_parts(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    client, bucket = deployment.s3.client(), deployment.s3.bucket
    dataset = landed.dataset("flights.csv")
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{dataset}/_manifest.json")["Body"].read())
    expected = [f"s3://{bucket}/{c['key']}" for c in sorted(manifest["chunks"], key=lambda c: c["chunkIndex"])]
    assert len(expected) == 2

    result = s3proc_read(deployment, f"{dataset}/", "--format", "parts", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == expected
    symlink = client.get_object(Bucket=bucket, Key=f"{dataset}/_symlink_format_manifest/manifest")["Body"].read()
    assert symlink.decode().splitlines() == expected  # what Athena reads is the same list


def test_read_limit_stops_after_n_records_across_parts_and_zero_prints_the_header(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    expected = source_rows(landed.flights, "read_csv")
    name = f"{FOLDER}/flights.csv"
    three = s3proc_read(deployment, name, "--limit", "3", cwd=tmp_path)
    assert three.returncode == 0, three.stderr.decode()
    assert len(three.stdout.splitlines()) == 4 and csv_rows(three.stdout, tmp_path) == expected[:3]

    across = s3proc_read(deployment, name, "--limit", "50001", cwd=tmp_path)  # one record into the second part
    assert across.returncode == 0 and csv_rows(across.stdout, tmp_path) == expected[:50_001]

    header = s3proc_read(deployment, name, "--limit", "0", cwd=tmp_path)
    assert header.returncode == 0 and header.stdout.decode().replace('"', "") == ",".join(HEADER) + "\n"

    lines = s3proc_read(deployment, name, "--format", "jsonl", "--limit", "2", cwd=tmp_path)
    assert lines.returncode == 0, lines.stderr.decode()
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(r["userId"], r["seq"], r["offerExpiry"]) for r in records] == [
        (row[0], row[4], row[2].isoformat()) for row in expected[:2]
    ]


def test_read_output_writes_the_format_its_extension_names(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    name = f"{FOLDER}/flights.csv"
    expected = source_rows(landed.flights, "read_csv")
    parquet = tmp_path / "flights.parquet"
    result = s3proc_read(deployment, name, "--output", str(parquet), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == b"", result.stderr.decode()
    assert pq.read_table(parquet).num_rows == 60_000
    assert source_rows(parquet, "read_parquet") == expected

    jsonl = tmp_path / "flights.jsonl"
    assert s3proc_read(deployment, name, "--limit", "10", "--output", str(jsonl), cwd=tmp_path).returncode == 0
    assert [json.loads(line)["seq"] for line in jsonl.read_text().splitlines()] == list(range(10))

    unknown = s3proc_read(deployment, name, "--output", str(tmp_path / "flights.xlsx"), cwd=tmp_path)
    assert unknown.returncode == 2 and ".parquet" in unknown.stderr.decode()
    assert not (tmp_path / "flights.xlsx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flights.jsonl", "flights.parquet"]  # no partial left


def test_read_rejected_gives_the_records_that_failed_validation_with_their_rules(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    name = f"{FOLDER}/promo_mixed.csv"
    source = source_rows(landed.promo, "read_csv")
    rejected = s3proc_read(deployment, name, "--rejected", "--format", "jsonl", cwd=tmp_path)
    assert rejected.returncode == 0, rejected.stderr.decode()
    records = [json.loads(line) for line in rejected.stdout.splitlines()]
    assert [(r["seq"], r["promoCode"], r["_rules"]) for r in records] == [
        (i, "bad", ["invalidPromoCode"]) for i in sorted(BAD_CODES)
    ]
    valid = s3proc_read(deployment, name, cwd=tmp_path)
    assert csv_rows(valid.stdout, tmp_path) == [row for i, row in enumerate(source) if i not in BAD_CODES]

    none = s3proc_read(deployment, f"{FOLDER}/flights.csv", "--rejected", cwd=tmp_path)  # no rule set selects it
    assert none.returncode == 0 and none.stdout == b"" and "has no rejected records" in none.stderr.decode()


def test_read_of_a_non_tabular_file_gives_its_uri_or_its_bytes(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    name = f"{FOLDER}/image.bin"
    uri = s3proc_read(deployment, name, "--format", "parts", cwd=tmp_path)
    assert uri.stdout.decode() == f"s3://{deployment.s3.bucket}/{landed.dataset('image.bin')}\n"
    target = tmp_path / "copy.bin"
    assert s3proc_read(deployment, name, "--output", str(target), cwd=tmp_path).returncode == 0
    assert target.read_bytes() == landed.blob
    assert "--output FILE" in one_line_error(s3proc_read(deployment, name, cwd=tmp_path))


def test_read_of_an_archive_names_an_entry_to_read_instead(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    error = one_line_error(s3proc_read(deployment, f"{FOLDER}/bundle.zip", cwd=tmp_path))
    assert "is an archive" in error and "bundle.zip!/inner.csv" in error
    entry = s3proc_read(deployment, f"{FOLDER}/bundle.zip!/inner.csv", "--format", "parts", cwd=tmp_path)
    assert entry.returncode == 0 and f"/{landed.dataset('bundle.zip/inner.csv')}/v-" in entry.stdout.decode()


def test_read_of_a_file_no_record_has_says_no_file_matches(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    error = one_line_error(s3proc_read(deployment, f"{FOLDER}/never-dropped.csv", cwd=tmp_path))
    assert f"no file matches {FOLDER}/never-dropped.csv" in error


def test_read_of_a_dataset_without_its_manifest_says_the_manifest_is_missing(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    dataset = landed.dataset("unmanifested.csv")
    deployment.s3.client().delete_object(Bucket=deployment.s3.bucket, Key=f"{dataset}/_manifest.json")
    error = one_line_error(s3proc_read(deployment, f"{FOLDER}/unmanifested.csv", cwd=tmp_path))
    assert "COMPLETED" in error and "has no readable _manifest.json" in error and dataset in error


def test_read_of_a_failed_file_says_failed_and_why_and_where_its_last_version_is(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    path = write_csv(deployment.watch / FOLDER / "changed.csv", promo_rows(5, 75))
    first_version = source_rows(path, "read_csv")
    (request,) = run_requests_under(sensor_tick(deployment), FOLDER)
    assert execute(request, deployment).success
    path.write_text("a,b\n1,2\n3,4,5,6\n7\n")  # a second version that cannot convert
    (request,) = run_requests_under(sensor_tick(deployment), FOLDER)
    assert not execute(request, deployment).success
    record = deployment.store().get_by_path(str(path))
    assert record.status is S.FAILED and record.error_details

    error = one_line_error(s3proc_read(deployment, f"{FOLDER}/changed.csv", cwd=tmp_path))
    assert f"{path} is FAILED, not COMPLETED: {' '.join(record.error_details.split())}" in error
    dataset_uri = f"s3://{deployment.s3.bucket}/{landed.dataset('changed.csv')}/"
    assert f"s3proc read {dataset_uri}" in error
    earlier = s3proc_read(deployment, dataset_uri, cwd=tmp_path)  # the committed version, as the error says
    assert earlier.returncode == 0 and csv_rows(earlier.stdout, tmp_path) == first_version


# ---- no server needed ------------------------------------------------------------------


def test_csv_writes_a_nested_value_as_its_json_text_and_jsonl_keeps_it_nested() -> None:
    batch = pa.record_batch(
        {
            "id": [1, 2],
            "tags": [["a", "b"], None],
            "place": [{"city": "Oslo", "since": date(2027, 1, 2)}, None],
        }
    )
    as_csv, as_jsonl = io.BytesIO(), io.BytesIO()
    assert read.write_csv(pa.RecordBatchReader.from_batches(batch.schema, [batch]), as_csv) == 2
    assert list(csv.reader(io.StringIO(as_csv.getvalue().decode()))) == [
        ["id", "tags", "place"],
        ["1", '["a", "b"]', '{"city": "Oslo", "since": "2027-01-02"}'],
        ["2", "", ""],
    ]
    assert read.write_jsonl(pa.RecordBatchReader.from_batches(batch.schema, [batch]), as_jsonl) == 2
    assert [json.loads(line) for line in as_jsonl.getvalue().splitlines()] == [
        {"id": 1, "tags": ["a", "b"], "place": {"city": "Oslo", "since": "2027-01-02"}},
        {"id": 2, "tags": None, "place": None},
    ]


def test_a_dataset_is_named_by_its_uri_or_key_in_the_output_bucket_only() -> None:
    assert read.key_in_bucket("s3://s3proc/nyc/flights.csv/", "s3proc") == "nyc/flights.csv"
    assert read.key_in_bucket("s3://s3proc/nyc/flights.csv/_manifest.json", "s3proc") == "nyc/flights.csv"
    assert read.key_in_bucket("nyc/flights.csv/", "s3proc") == "nyc/flights.csv"
    assert read.key_in_bucket("nyc/old_manifest.json", "s3proc") == "nyc/old_manifest.json"
    assert read.key_in_bucket("s3://elsewhere/nyc/flights.csv/", "s3proc") is None
    assert read.key_in_bucket("/data/incoming/nyc/flights.csv", "s3proc") is None


# ---- the README's snippet ---------------------------------------------------------------

SNIPPET = re.compile(r"<!-- read-back-snippet:start -->\s*```python\n(.*?)```\s*<!-- read-back-snippet:end -->", re.S)
LOCAL_SETUP = {  # what scripts/dev sets up, and so what the README must spell out
    "ENDPOINT": "http://127.0.0.1:8333",
    "ACCESS_KEY": "s3proc-dev",
    "SECRET_KEY": "s3proc-dev-secret",
    "BUCKET": "s3proc",
    "DATASET": "nyc/flights.csv",
}


def readme_snippet() -> str:
    (snippet,) = SNIPPET.findall((ROOT / "README.md").read_text())
    return snippet


def test_readme_snippet_spells_out_the_local_setup_of_scripts_dev() -> None:
    from s3proc_dagster.cli.dev import DEV_ACCESS_KEY, DEV_SECRET_KEY
    from s3proc_dagster.settings import S3Config

    assert (LOCAL_SETUP["ACCESS_KEY"], LOCAL_SETUP["SECRET_KEY"]) == (DEV_ACCESS_KEY, DEV_SECRET_KEY)
    assert LOCAL_SETUP["BUCKET"] == S3Config.model_fields["bucket"].default
    snippet = readme_snippet()
    for name, value in LOCAL_SETUP.items():
        assert re.findall(rf"^{name} = (\"[^\"]*\")", snippet, re.M) == [json.dumps(value)], name


def test_readme_snippet_run_as_written_prints_the_datasets_row_count(
    deployment: Deployment, landed: Landed, tmp_path: Path
) -> None:
    """Only the local setup's values change (this SeaweedFS, its keys, the test's dataset)."""
    here = {
        "ENDPOINT": deployment.s3.url,
        "ACCESS_KEY": deployment.s3.access_key,
        "SECRET_KEY": deployment.s3.secret_key,
        "BUCKET": deployment.s3.bucket,
        "DATASET": landed.dataset("flights.csv"),
    }
    snippet = readme_snippet()
    for name, value in here.items():
        snippet, n = re.subn(rf"^{name} = \"[^\"]*\"", f"{name} = {json.dumps(value)}", snippet, flags=re.M)
        assert n == 1, name
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}  # nothing but the snippet
    result = subprocess.run(
        [sys.executable, "-c", snippet], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(source_rows(landed.flights, "read_csv")))
