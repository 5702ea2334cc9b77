"""Running models and column tests in DuckDB."""

from __future__ import annotations

import string
from collections.abc import Iterable
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


#: Characters that mean something to an HTML parser, and line breaks (which would end
#: the table row), as character references: the renderer shows them as the text they are.
_AS_REFERENCE = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;", "\n": "&#10;", "\r": "&#13;"}
#: CommonMark lets a backslash take the meaning away from any ASCII punctuation; escaping
#: all of it, not a list of the characters that matter today, also covers emphasis, code,
#: links, a cell's `|` (GFM) and autolinks (`http\://` is no longer one).
_BACKSLASHED = frozenset(string.punctuation) - set(_AS_REFERENCE)


def markdown_text(value: Any) -> str:
    """`value` as Markdown that renders as exactly its text, in one table cell.

    The previews show file names and error messages, which whoever drops a file
    chooses: unescaped, `a|b` splits a cell, `[x](javascript:...)` is a link and
    `<img onerror=...>` HTML in the Dagster UI."""
    return "".join(_AS_REFERENCE.get(c) or (f"\\{c}" if c in _BACKSLASHED else c) for c in str(value))


def preview_markdown(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(markdown_text(c) for c in cells) + " |\n"

    return line(columns) + "|" + "---|" * len(columns) + "\n" + "".join(line(row) for row in rows)
