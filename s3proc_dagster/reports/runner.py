"""Running models and column tests in DuckDB."""

from __future__ import annotations

from typing import Any

import duckdb

from s3proc_dagster.errors import S3ProcError
from s3proc_dagster.reports.project import ColumnTest, Project


class ReportModelError(S3ProcError):
    """A model's SQL failed; the message names its file and carries DuckDB's reason."""


def run_model(conn: duckdb.DuckDBPyConnection, project: Project, name: str) -> tuple[int, list[tuple], list[str]]:
    """Materialise one model as a table; return its row count, a preview and its columns."""
    model = project.models[name]
    sql = project.render(name)
    try:
        conn.execute(f'CREATE OR REPLACE TABLE "{name}" AS {sql}')
    except duckdb.Error as exc:
        raise ReportModelError(f"{model.path.name}: {' '.join(str(exc).split())}") from None
    count = conn.execute(f'SELECT count(*) FROM "{name}"').fetchall()[0][0]
    preview = conn.execute(f'SELECT * FROM "{name}" LIMIT 10')
    columns = [d[0] for d in preview.description]
    return count, preview.fetchall(), columns


def failing_rows_sql(test: ColumnTest) -> str:
    """The dbt meaning of each test, as a query counting the rows that violate it."""
    t, c = f'"{test.model}"', f'"{test.column}"'
    if test.kind == "not_null":
        return f"SELECT count(*) FROM {t} WHERE {c} IS NULL"
    if test.kind == "unique":
        return f"SELECT count(*) FROM (SELECT {c} FROM {t} WHERE {c} IS NOT NULL GROUP BY {c} HAVING count(*) > 1)"
    if test.kind == "accepted_values":
        values = ", ".join("'" + v.replace("'", "''") + "'" for v in test.values)
        return f"SELECT count(*) FROM {t} WHERE {c} IS NOT NULL AND CAST({c} AS VARCHAR) NOT IN ({values})"
    if test.kind == "relationships":
        return (
            f"SELECT count(*) FROM {t} AS child WHERE child.{c} IS NOT NULL AND NOT EXISTS "
            f'(SELECT 1 FROM "{test.to_model}" AS parent WHERE parent."{test.to_field}" = child.{c})'
        )
    raise ValueError(test.kind)


def run_test(conn: duckdb.DuckDBPyConnection, test: ColumnTest) -> int:
    return int(conn.execute(failing_rows_sql(test)).fetchall()[0][0])


def preview_markdown(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in rows)
