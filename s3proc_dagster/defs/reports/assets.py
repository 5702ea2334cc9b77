"""The SQL reports as Dagster assets: the model DAG is the asset graph, tests are checks.

`progress_sources` exports the store and the S3 manifests into the DuckDB file
(REPORTS_DB_PATH) as `progress__<table>`; each model in `dbt_like_sql/models` is an
asset depending on it and on the models it `ref`s; each column test in `schema.yml` is
an asset check on its model.
"""

from pathlib import Path

import dagster as dg

from s3proc_dagster.defs.resources import ProgressStoreResource, ReportsDatabase, S3Storage
from s3proc_dagster.reports.project import ColumnTest, Project, load_project, source_table
from s3proc_dagster.reports.runner import preview_markdown, run_model, run_test

GROUP = "reports"
SOURCES_KEY = dg.AssetKey(["reports", "progress_sources"])
DEFAULT_PROJECT = Path(__file__).resolve().parents[3] / "dbt_like_sql"


def model_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["reports", name])


@dg.asset(key=SOURCES_KEY, group_name=GROUP, description="The progress store and S3 manifests, as tables.")
def progress_sources(
    duckdb: ReportsDatabase, progress_store: ProgressStoreResource, s3: S3Storage
) -> dg.MaterializeResult:
    # pyarrow with the tables, in the run: the code server never builds them (58 MB)
    from s3proc_dagster.reports.sources import dataset_table, progress_tables

    tables = progress_tables(progress_store.open())
    tables["datasets"] = dataset_table(s3.get_client(), s3.bucket, s3.prefix)
    with duckdb.get_connection() as conn:
        for name, table in tables.items():
            conn.register("_incoming", table)
            conn.execute(f'CREATE OR REPLACE TABLE "{source_table("progress", name)}" AS SELECT * FROM _incoming')
            conn.unregister("_incoming")
    return dg.MaterializeResult(metadata={f"{name}_rows": t.num_rows for name, t in tables.items()})


def _model_asset(project: Project, name: str) -> dg.AssetsDefinition:
    model = project.models[name]

    @dg.asset(
        key=model_key(name),
        group_name=GROUP,
        description=model.description or f"dbt_like_sql/models/{model.path.name}",
        deps=[SOURCES_KEY, *(model_key(r) for r in sorted(model.refs))],
        metadata={"sql_file": f"dbt_like_sql/models/{model.path.name}"},
    )
    def _asset(duckdb: ReportsDatabase) -> dg.MaterializeResult:
        with duckdb.get_connection() as conn:
            count, rows, columns = run_model(conn, project, name)
        return dg.MaterializeResult(
            metadata={"row_count": count, "preview": dg.MetadataValue.md(preview_markdown(columns, rows))}
        )

    return _asset


def _check(test: ColumnTest) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=model_key(test.model), name=test.name, description=f"{test.kind} on {test.column}")
    def _run(duckdb: ReportsDatabase) -> dg.AssetCheckResult:
        with duckdb.get_connection() as conn:
            failing = run_test(conn, test)
        return dg.AssetCheckResult(
            passed=failing == 0, severity=dg.AssetCheckSeverity.ERROR, metadata={"failing_rows": failing}
        )

    return _run


def build_report_defs(project_dir: Path = DEFAULT_PROJECT) -> tuple[list, list]:
    project = load_project(project_dir)
    assets = [progress_sources, *(_model_asset(project, n) for n in project.order())]
    checks = [_check(t) for m in project.models.values() for t in m.tests]
    return assets, checks


@dg.definitions
def defs() -> dg.Definitions:
    """The models are read from dbt_like_sql/ when the code location loads (files only)."""
    assets, checks = build_report_defs()
    return dg.Definitions(assets=assets, asset_checks=checks)
