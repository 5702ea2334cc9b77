"""The dbt-shaped SQL reports: Jinja-resolved DAG, DuckDB models, column tests as asset checks."""

from __future__ import annotations

import shutil
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from markdown_it import MarkdownIt

from benchmarks.support import Deployment, promo_rows, write_csv
from s3proc_dagster.defs.resources import Settings, resources_for
from s3proc_dagster.reports.project import ReportProjectError, load_project
from s3proc_dagster.reports.runner import ReportModelError, preview_markdown, run_model
from s3proc_dagster.runs.reconstructable import definitions
from s3proc_dagster_tests.pipeline_helpers import COMMAND_DIR, execute, run_requests_under, sensor_tick

PROJECT = Path(__file__).resolve().parents[1] / "dbt_like_sql"


def test_refs_and_sources_resolve_into_a_dag() -> None:
    project = load_project(PROJECT)
    assert project.models["chunk_throughput"].refs == {"file_status"}
    assert ("progress", "chunk_status") in project.models["chunk_throughput"].sources
    order = project.order()
    assert order.index("file_status") < order.index("chunk_throughput")
    assert order.index("file_status") < order.index("failures_by_reason")
    assert "from progress__file_status" in project.render("file_status")
    kinds = {(t.model, t.column, t.kind) for m in project.models.values() for t in m.tests}
    assert ("chunk_throughput", "file_id", "relationships") in kinds
    assert ("file_status", "status", "accepted_values") in kinds


def test_broken_model_fails_with_its_file_name_and_duckdbs_message(tmp_path: Path) -> None:
    project_dir = tmp_path / "proj"
    shutil.copytree(PROJECT, project_dir)
    (project_dir / "models" / "broken.sql").write_text("select no_such_column from {{ ref('file_status') }}")
    project = load_project(project_dir)
    conn = duckdb.connect()
    conn.execute("CREATE TABLE file_status AS SELECT 1 AS file_id")
    with pytest.raises(ReportModelError, match=r"broken\.sql: Binder Error: .*no_such_column"):
        run_model(conn, project, "broken")
    (project_dir / "models" / "broken.sql").write_text("select * from {{ ref('nope') }}")
    with pytest.raises(ReportProjectError, match=r"broken\.sql: ref\('nope'\) names no model"):
        load_project(project_dir)


class _Cells(HTMLParser):
    """The tags of an HTML fragment, and the text of each table row's cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.rows: list[list[str]] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][-1] += data


def rendered_cells(markdown: str) -> _Cells:
    """`markdown` through a CommonMark renderer with GFM tables and raw HTML passed on, as
    a Markdown view that trusts its input would show it."""
    cells = _Cells()
    cells.feed(MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown))
    return cells


@pytest.mark.parametrize(
    "name",
    [
        "x|<img src=x onerror=alert(1)>[a](javascript:alert(1)).csv",
        "<script>alert(1)</script>.csv",
        "two\nlines *em* _em_ `code` \\back & amp; https://example.com/x.csv",
        "| a | b |\n|---|---|\n| forged | row |",
    ],
)
def test_a_file_name_shows_as_its_text_in_one_preview_cell(name: str) -> None:
    cells = rendered_cells(preview_markdown(["file_name", "status"], [(name, "failed"), ("plain.csv", 3)]))
    assert cells.rows == [["file_name", "status"], [name, "failed"], ["plain.csv", "3"]]
    assert cells.tags <= {"table", "thead", "tbody", "tr", "th", "td"}, "markup from the name was rendered"


def test_the_preview_check_sees_an_unescaped_name() -> None:
    """The check above can fail: a name put in the table as it is breaks the cell and the markup."""
    cells = rendered_cells("| file_name | status |\n|---|---|\n| x|<img src=x onerror=alert(1)> | failed |\n")
    assert "img" in cells.tags and cells.rows[1] == ["x", ""]


def test_reports_materialize_on_the_instance_and_a_broken_relationship_fails_its_check(deployment: Deployment) -> None:
    folder = deployment.watch / "reports"
    folder.mkdir()
    (folder / "promo_r.csv").write_text(
        "userId,promoCode,offerExpiry,amount\n,ABCD1234,2027-01-01,1\n ,ABCD1234,2027-01-01,1\nu1,bad,2027-01-01,1\nu2,ABCD1234,2027-01-01,1\n"
    )
    (folder / "not.zip").write_text("hello, I am text")
    for request in run_requests_under(sensor_tick(deployment), "reports"):
        execute(request, deployment)

    from s3proc_dagster.defs.reports.assets import build_report_defs

    report_assets, report_checks = build_report_defs()

    def materialize() -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [*report_assets, *report_checks],
            resources=definitions().resources,
            instance=deployment.instance(),
            raise_on_error=False,
        )

    result = materialize()
    assert result.success
    store = deployment.store()
    files = store.list_files()
    conn = duckdb.connect(deployment.env["REPORTS_DB_PATH"], read_only=True)
    assert conn.execute("select count(*) from file_status").fetchall()[0][0] == len(files)
    reasons = conn.execute("select step, files from failures_by_reason").fetchall()
    assert any(step == "type_detection" for step, _ in reasons)
    expected: dict[str, int] = {}
    for f in files:
        for rule, n in f.error_summary.get("validation", {}).items():
            expected[rule] = expected.get(rule, 0) + n
    by_rule = dict(conn.execute("select rule, records from validation_errors_by_rule").fetchall())
    assert by_rule == expected and by_rule["invalidUserId"] >= 2 and by_rule["invalidPromoCode"] >= 1
    conn.close()
    assert all(e.passed for e in result.get_asset_check_evaluations())

    # a file record deleted behind the store's back: its chunks now point at nothing
    victim = store.get_by_path(str(folder / "promo_r.csv")).file_id
    raw = sqlite3.connect(deployment.env["PROGRESS_DB_PATH"])
    raw.execute("DELETE FROM file_status WHERE file_id = ?", (victim,))
    raw.commit()
    raw.close()
    again = materialize()
    failed = {e.check_name for e in again.get_asset_check_evaluations() if not e.passed}
    assert failed == {"file_id_relationships_file_status"}


def test_reports_materialize_from_the_command_line(deployment: Deployment) -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "s3proc_dagster.definitions",
            "--select",
            "group:reports",
        ],
        cwd=COMMAND_DIR,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    conn = duckdb.connect(deployment.env["REPORTS_DB_PATH"], read_only=True)
    tables = {r[0] for r in conn.execute("select table_name from information_schema.tables").fetchall()}
    conn.close()
    assert {
        "file_status",
        "chunk_throughput",
        "failures_by_reason",
        "validation_errors_by_rule",
        "s3_datasets",
    } <= tables


def test_reports_refresh_is_not_requested_again_while_one_is_in_flight(deployment: Deployment) -> None:
    write_csv(deployment.watch / "refresh" / "r.csv", promo_rows(2))
    (request,) = run_requests_under(sensor_tick(deployment), "refresh")
    assert execute(request, deployment).success  # a file settled: a refresh is due
    defs = definitions()
    sensor = defs.resolve_sensor_def("reports_refresh_sensor")
    instance = deployment.instance()
    resources = resources_for(Settings(overrides={"REPORTS_AUTO_REFRESH": "true"}))

    def tick() -> dg.SensorExecutionData:
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            return sensor.evaluate_tick(context)

    queued = instance.create_run_for_job(defs.resolve_job_def("reports_job"), status=dg.DagsterRunStatus.NOT_STARTED)
    try:
        held = tick()
        assert not held.run_requests
        assert queued.run_id in (held.skip_message or "")
    finally:
        instance.delete_run(queued.run_id)
    (due,) = tick().run_requests
    assert due.job_name in (None, "reports_job")
