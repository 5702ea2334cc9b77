"""Record validation in the conversion pass: exact counts, rejected rows kept, rules as SQL."""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path

import duckdb
import pytest

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.tabular import convert_to_parquet_chunks
from s3proc_dagster.files.validation import RuleSetError, rule_set_for
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.settings import DEFAULT_RULES_DIR
from s3proc_dagster_tests.conftest import Deployment
from s3proc_dagster_tests.pipeline_helpers import execute, run_requests_under, sensor_tick

RULES = ("invalidUserId", "invalidPromoCode", "expiredOffer")


def promo_record(i: int) -> tuple[list[str], set[str]]:
    """Record i and the rules it breaks (as of 2026-01-01)."""
    user, code, expiry, broken = f"u-{i:07d}", f"CODE{i:06d}", "2027-03-01", set()
    kind = i % 1000
    if kind in (1, 5):
        user = "  " if kind == 1 else ""
        broken.add("invalidUserId")
    if kind in (2, 5):
        code = f"bad-{i}"
        broken.add("invalidPromoCode")
    if kind == 3:
        expiry = "2020-01-01"
        broken.add("expiredOffer")
    if kind == 4:
        expiry = "not-a-date"
        broken.add("expiredOffer")
    return [user, code, expiry, f"{i % 500}.25"], broken


def write_promos(path: Path, n: int) -> list[set[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    broken = []
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["userId", "promoCode", "offerExpiry", "amount"])
        for i in range(n):
            row, rules = promo_record(i)
            writer.writerow(row)
            broken.append(rules)
    return broken


def expected_counts(broken: list[set[str]], start: int, end: int) -> tuple[int, dict[str, int]]:
    window = broken[start : end + 1]
    per_rule = {r: sum(r in b for b in window) for r in RULES}
    return sum(bool(b) for b in window), {r: c for r, c in per_rule.items() if c}


def test_promotions_file_has_exact_per_chunk_and_per_file_counts(deployment: Deployment, tmp_path: Path) -> None:
    path = deployment.watch / "valid" / "promo_batch_123.csv"
    broken = write_promos(path, 120_001)
    (request,) = run_requests_under(sensor_tick(deployment), "valid")
    assert execute(request, deployment).success
    store = deployment.store()
    record = store.get_by_path(str(path))
    assert record.status is S.COMPLETED
    chunks = store.list_chunks(record.file_id)
    assert len(chunks) == 3
    for chunk in chunks:
        failed, per_rule = expected_counts(broken, chunk.start_offset, chunk.end_offset)
        assert chunk.processing_stats.failed_records == failed
        assert chunk.processing_stats.successful_records == chunk.record_count - failed
        assert chunk.error_summary["validation"] == per_rule
        assert chunk.processing_stats.success_rate == round((chunk.record_count - failed) / chunk.record_count * 100, 2)
    failed_all, per_rule_all = expected_counts(broken, 0, 120_000)
    stats = record.processing_stats
    assert (stats.successful_records, stats.failed_records) == (120_001 - failed_all, failed_all)
    assert record.error_summary["validation"] == per_rule_all
    assert per_rule_all["invalidUserId"] + per_rule_all["invalidPromoCode"] > failed_all - per_rule_all["expiredOffer"]

    # valid + rejected read back from S3 add up to the source, row for row
    client = deployment.s3.client()
    dataset = f"{deployment.prefix}/valid/promo_batch_123.csv"
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=deployment.s3.bucket, Prefix=dataset + "/")["Contents"])
    local = {}
    for key in keys:
        if key.endswith(".parquet"):
            target = tmp_path / key.replace("/", "_")
            client.download_file(deployment.s3.bucket, key, str(target))
            local[key] = str(target)
    valid = [v for k, v in local.items() if "/_rejected/" not in k]
    rejected = [v for k, v in local.items() if "/_rejected/" in k]
    assert len(valid) == 3 and len(rejected) == 3
    got_valid = duckdb.execute(f"SELECT count(*) FROM read_parquet({valid!r})").fetchall()[0][0]
    got_rejected = duckdb.execute(f"SELECT userId, _rules FROM read_parquet({rejected!r})").fetchall()
    assert got_valid + len(got_rejected) == 120_001 and len(got_rejected) == failed_all
    assert sorted(r for r in got_rejected if len(r[1]) == 2)[0][1] == ["invalidUserId", "invalidPromoCode"]


def test_file_no_rule_set_selects_has_no_rejected_output(deployment: Deployment) -> None:
    path = deployment.watch / "unvalidated" / "orders.csv"
    write_promos(path, 2_000)
    (request,) = run_requests_under(sensor_tick(deployment), "unvalidated")
    assert execute(request, deployment).success
    record = deployment.store().get_by_path(str(path))
    assert record.processing_stats.failed_records == 0 and record.processing_stats.success_rate == 100.0
    client = deployment.s3.client()
    listed = client.list_objects_v2(Bucket=deployment.s3.bucket, Prefix=f"{deployment.prefix}/unvalidated/orders.csv/_rejected/")
    assert listed.get("KeyCount", 0) == 0


def test_rule_set_selects_promotions_twins_by_glob() -> None:
    for rel in ("promo_1.csv", "a/b/promo_x.tsv", "x/promotions.jsonl", "promo.json"):
        assert rule_set_for(rel, DEFAULT_RULES_DIR).name == "promotions"
    assert rule_set_for("orders.csv", DEFAULT_RULES_DIR) is None


def test_missing_column_fails_naming_the_rule_file(tmp_path: Path) -> None:
    src = tmp_path / "promo_bad.csv"
    src.write_text("userId,amount\nu1,3\n")
    rule_set = rule_set_for(src.name, DEFAULT_RULES_DIR)
    with pytest.raises(ConversionError, match=r"promotions\.yml needs column\(s\) promoCode, offerExpiry"):
        convert_to_parquet_chunks(src, "csv", tmp_path / "out", 10, rules=rule_set.render(date(2026, 1, 1)), required_columns=rule_set.columns)


def test_broken_rule_sql_and_broken_yaml_name_their_file_and_rule(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    (rules / "r").mkdir(parents=True)
    (rules / "r.yml").write_text("select: ['**/*.csv']\nrules:\n  noSuchColumn: r/bad.sql\n")
    (rules / "r" / "bad.sql").write_text("nope_column > 3")
    src = tmp_path / "a.csv"
    src.write_text("x\n1\n")
    rule_set = rule_set_for("a.csv", rules)
    with pytest.raises(ConversionError, match=r"r\.yml: rule noSuchColumn \(bad\.sql\): .*nope_column"):
        convert_to_parquet_chunks(src, "csv", tmp_path / "out", 10, rules=rule_set.render(date(2026, 1, 1)))
    (rules / "s.yml").write_text("select: [unclosed\n")
    with pytest.raises(RuleSetError, match=r"s\.yml: not valid YAML"):
        rule_set_for("a.csv", rules)
