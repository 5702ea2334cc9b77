"""SQL text for DuckDB, shared by the reader, the rule plan and the XML rewrite.

DuckDB takes parameters for values in a query but not in COPY ... TO, nor for column
names, so the few literals and identifiers built into SQL text are quoted here, once.
Its errors echo our SQL and advise on read_csv options the user cannot set, so every
message that reaches a user goes through `duckdb_reason`.
"""

from __future__ import annotations


def sql_string(value: str) -> str:
    """A SQL string literal, for the few places DuckDB takes no parameter (COPY ... TO)."""
    return "'" + value.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """A quoted SQL identifier (a column name from a rule set)."""
    return '"' + name.replace('"', '""') + '"'


def duckdb_reason(exc: BaseException) -> str:
    """DuckDB's reason on one line, without its advice on reader options and its SQL echo.

    The user cannot set read_csv options, and the echoed SQL carries our full path.
    """
    message = " ".join(str(exc).split())
    for noise in (" Possible fixes:", " Possible solutions:", " Try increasing", " LINE 1:"):
        message = message.split(noise, 1)[0]
    return message[:600]
