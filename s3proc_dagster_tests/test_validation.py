"""Record validation in the conversion pass: exact counts, rejected rows kept, rules as SQL."""

from __future__ import annotations

import csv
import shutil
from datetime import date
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from benchmarks.support import Deployment
from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.tabular import ConversionResult, convert_to_parquet_chunks
from s3proc_dagster.files.validation import RuleSet, RuleSetError, rule_set_for
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.settings import DEFAULT_RULES_DIR
from s3proc_dagster_tests.pipeline_helpers import execute, run_requests_under, sensor_tick

RULES = ("invalidUserId", "invalidPromoCode", "expiredOffer")
AS_OF = date(2026, 1, 1)
# Named like a promotions file, but without offerExpiry (a file a user met); rows 1 and 4
# break invalidUserId, rows 2 and 4 invalidPromoCode.
NO_EXPIRY = "userId,promoCode,amount\nu0,CODE0001,1\n ,CODE0002,2\nu2,bad-2,3\nu3,CODE0004,4\n,bad-4,5\nu5,CODE0006,6\n"
NO_EXPIRY_USERS = ["u0", " ", "u2", "u3", None, "u5"]


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
    keys = sorted(
        o["Key"] for o in client.list_objects_v2(Bucket=deployment.s3.bucket, Prefix=dataset + "/")["Contents"]
    )
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
    listed = client.list_objects_v2(
        Bucket=deployment.s3.bucket, Prefix=f"{deployment.prefix}/unvalidated/orders.csv/_rejected/"
    )
    assert listed.get("KeyCount", 0) == 0


def test_promo_named_file_without_offer_expiry_completes_in_the_pipeline(deployment: Deployment) -> None:
    """A file a user met: it failed with `promotions.yml needs column(s) offerExpiry`."""
    path = deployment.watch / "no_expiry" / "promo_batch_123.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(NO_EXPIRY)
    (request,) = run_requests_under(sensor_tick(deployment), "no_expiry")
    result = execute(request, deployment)
    assert result.success
    record = deployment.store().get_by_path(str(path))
    assert record.status is S.COMPLETED
    assert (record.processing_stats.successful_records, record.processing_stats.failed_records) == (3, 3)
    assert record.error_summary["validation"] == {"invalidUserId": 2, "invalidPromoCode": 2}
    assert record.error_summary["skippedRules"] == {"expiredOffer": 6}  # not evaluated on any of its 6 records
    shown = [  # and the UI says so, on the file's materialization
        e.event_specific_data.materialization.metadata["skipped_rules"].value
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
        and "skipped_rules" in e.event_specific_data.materialization.metadata
    ]
    assert shown == ["expiredOffer (missing column offerExpiry)"]


def test_rule_set_selects_promotions_twins_by_glob() -> None:
    for rel in ("promo_1.csv", "a/b/promo_x.tsv", "x/promotions.jsonl", "promo.json"):
        assert rule_set_for(rel, DEFAULT_RULES_DIR).name == "promotions"
    assert rule_set_for("orders.csv", DEFAULT_RULES_DIR) is None


def promotions_rules(tmp_path: Path, on_missing_columns: str | None) -> Path:
    """The shipped promotions rule set, with `on_missing_columns` set (None: key absent)."""
    rules = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES_DIR, rules)
    yml = rules / "promotions.yml"
    text = yml.read_text()
    assert "\non_missing_columns: skip_rules\n" in text
    line = f"on_missing_columns: {on_missing_columns}\n" if on_missing_columns else ""
    yml.write_text(text.replace("on_missing_columns: skip_rules\n", line))
    return rules


def convert_with(rule_set: RuleSet, src: Path, out: Path, chunk_size: int = 4) -> ConversionResult:
    """What the pipeline does with a file its rule set selects."""
    return convert_to_parquet_chunks(
        src,
        "csv",
        out,
        chunk_size,
        rules=rule_set.render(AS_OF),
        required_columns=rule_set.columns,
        on_missing_columns=rule_set.on_missing_columns,
    )


def read_parquet(paths: list[Path]) -> list[dict]:
    return [row for path in paths for row in pq.read_table(path).to_pylist()]


def test_shipped_promotions_rule_set_says_skip_rules_explicitly() -> None:
    assert rule_set_for("promo_batch_123.csv", DEFAULT_RULES_DIR).on_missing_columns == "skip_rules"


def test_promo_named_file_without_offer_expiry_completes_with_only_expired_offer_skipped(tmp_path: Path) -> None:
    rule_set = rule_set_for("promo_batch_123.csv", promotions_rules(tmp_path, None))
    assert rule_set.on_missing_columns == "skip_rules"  # the default when the key is absent
    src = tmp_path / "promo_batch_123.csv"
    src.write_text(NO_EXPIRY)

    result = convert_with(rule_set, src, tmp_path / "out")

    assert result.record_count == 6
    assert result.skipped_rules == {"expiredOffer": "missing column offerExpiry"}
    assert result.missing_columns == ("offerExpiry",)
    assert [(c.failed_records, c.rule_counts) for c in result.chunks] == [
        (2, {"invalidUserId": 1, "invalidPromoCode": 1}),
        (1, {"invalidUserId": 1, "invalidPromoCode": 1}),
    ]
    valid = read_parquet([c.path for c in result.chunks])
    rejected = read_parquet([c.rejected_path for c in result.chunks if c.rejected_path])
    assert [r["userId"] for r in valid] == ["u0", "u3", "u5"]
    assert [(r["userId"], r["_rules"]) for r in rejected] == [
        (" ", ["invalidUserId"]),
        ("u2", ["invalidPromoCode"]),
        (None, ["invalidUserId", "invalidPromoCode"]),
    ]


def test_fail_policy_fails_naming_the_rule_file_and_the_missing_columns(tmp_path: Path) -> None:
    rule_set = rule_set_for("promo_bad.csv", promotions_rules(tmp_path, "fail"))
    src = tmp_path / "promo_bad.csv"
    src.write_text("userId,amount\nu1,3\n")
    with pytest.raises(
        ConversionError, match=r"promotions\.yml needs column\(s\) promoCode, offerExpiry, which the file lacks"
    ):
        convert_with(rule_set, src, tmp_path / "out")


def test_reject_records_policy_sends_every_record_to_rejected_naming_missing_columns(tmp_path: Path) -> None:
    rule_set = rule_set_for("promo_batch_123.csv", promotions_rules(tmp_path, "reject_records"))
    src = tmp_path / "promo_batch_123.csv"
    src.write_text(NO_EXPIRY)

    result = convert_with(rule_set, src, tmp_path / "out")

    assert result.record_count == 6 and result.skipped_rules == {"expiredOffer": "missing column offerExpiry"}
    assert [c.failed_records for c in result.chunks] == [4, 2]
    assert result.chunks[0].rule_counts == {"missingColumns": 4, "invalidUserId": 1, "invalidPromoCode": 1}
    valid = read_parquet([c.path for c in result.chunks])
    rejected = read_parquet([c.rejected_path for c in result.chunks if c.rejected_path])
    assert valid == [] and len(valid) + len(rejected) == 6
    assert [r["userId"] for r in rejected] == NO_EXPIRY_USERS  # every record, in source order
    assert all(r["_rules"][0] == "missingColumns" for r in rejected)
    assert rejected[4]["_rules"] == ["missingColumns", "invalidUserId", "invalidPromoCode"]


def test_reject_records_policy_keeps_a_file_with_every_column_as_it_was(tmp_path: Path) -> None:
    rule_set = rule_set_for("promo_ok.csv", promotions_rules(tmp_path, "reject_records"))
    src = tmp_path / "promo_ok.csv"
    broken = write_promos(src, 2_000)
    result = convert_with(rule_set, src, tmp_path / "out", chunk_size=1_000)
    assert result.skipped_rules == {} and result.missing_columns == ()
    assert sum(c.failed_records for c in result.chunks) == expected_counts(broken, 0, 1_999)[0] == 10


def test_declared_columns_match_the_file_without_regard_to_case(tmp_path: Path) -> None:
    """DuckDB binds `"offerExpiry"` to a header `OFFEREXPIRY`, so the file has the column."""
    rule_set = rule_set_for("promo_upper.csv", promotions_rules(tmp_path, "fail"))
    src = tmp_path / "promo_upper.csv"
    src.write_text("USERID,PromoCode,OFFEREXPIRY,Amount\nu1,CODE0001,2020-01-01,3\n")
    result = convert_with(rule_set, src, tmp_path / "out")
    assert result.skipped_rules == {} and result.chunks[0].rule_counts == {"expiredOffer": 1}


@pytest.mark.parametrize(
    "sql, reason",
    [
        ('no_such_function("y") > 1', "no_such_function"),  # needs missing y, and is wrong anyway
        ('"y" > 1 OR nope_column > 3', "nope_column"),  # a column nobody declared: a typo
        ('"x" >', "syntax error"),
    ],
)
def test_a_rule_with_a_genuine_sql_error_fails_the_file_even_when_its_column_is_missing(
    tmp_path: Path, sql: str, reason: str
) -> None:
    rules = tmp_path / "rules"
    (rules / "r").mkdir(parents=True)
    (rules / "r.yml").write_text(
        "select: ['**/*.csv']\ncolumns: [x, y]\nrules:\n  fine: r/fine.sql\n  broken: r/broken.sql\n"
    )
    (rules / "r" / "fine.sql").write_text('"y" IS NULL')
    (rules / "r" / "broken.sql").write_text(sql)
    src = tmp_path / "a.csv"
    src.write_text("x\n1\n")
    rule_set = rule_set_for("a.csv", rules)
    assert rule_set.on_missing_columns == "skip_rules"
    with pytest.raises(ConversionError, match=rf"r\.yml: rule broken \(broken\.sql\): .*{reason}"):
        convert_with(rule_set, src, tmp_path / "out")


def test_a_rule_needing_two_missing_columns_names_both(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    (rules / "r").mkdir(parents=True)
    (rules / "r.yml").write_text(
        "select: ['**/*.csv']\ncolumns: [x, y, z]\nrules:\n  both: r/both.sql\n  onX: r/x.sql\n"
    )
    (rules / "r" / "both.sql").write_text('"y" > "z"')
    (rules / "r" / "x.sql").write_text('"x" > 1')
    src = tmp_path / "a.csv"
    src.write_text("x\n1\n2\n")
    result = convert_with(rule_set_for("a.csv", rules), src, tmp_path / "out")
    assert result.skipped_rules == {"both": "missing columns y, z"} and result.missing_columns == ("y", "z")
    assert result.chunks[0].rule_counts == {"onX": 1}


@pytest.mark.parametrize(
    "yml, message",
    [
        (
            "on_missing_columns: ignore\n",
            r"on_missing_columns must be one of fail, skip_rules, reject_records, not 'ignore'",
        ),
        ("", r"rule name 'missingColumns' is reserved"),
    ],
)
def test_rule_set_with_an_unknown_policy_or_the_reserved_rule_name_is_refused(
    tmp_path: Path, yml: str, message: str
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    name = "missingColumns" if not yml else "ok"
    (rules / "r.yml").write_text(f"select: ['**/*.csv']\n{yml}rules:\n  {name}: r/x.sql\n")
    with pytest.raises(RuleSetError, match=message):
        rule_set_for("a.csv", rules)


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
