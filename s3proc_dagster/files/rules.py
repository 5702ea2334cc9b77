"""Validation rules as the conversion's single pass evaluates them, and which of them run.

Validation rides the conversion's one pass (`tabular.py`): each rule is a SQL boolean
over a record's columns, evaluated inside the SELECT into a `__rules` list; valid and
rejected records are then split per batch with Arrow compute (`chunks.py`: vectorised,
never a Python loop over records). Which rules run is decided before the pass by binding
each one against the file's columns (`plan_rules`): a rule set's `on_missing_columns`
says what a file without a declared column gets (fail it, skip the rules that need the
column, or reject every record). Rule sets themselves are read in `validation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import duckdb

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.sql import duckdb_reason, sql_identifier, sql_string

SHAPE_TABLE = "__shape"  # the file's columns and types, no rows: rules are bound against it

MissingColumnsPolicy = Literal["fail", "skip_rules", "reject_records"]
MISSING_COLUMNS_POLICIES: tuple[str, ...] = get_args(MissingColumnsPolicy)
DEFAULT_MISSING_COLUMNS: MissingColumnsPolicy = "skip_rules"
# The `_rules` entry of every record of a file lacking a declared column, under reject_records.
MISSING_COLUMNS_RULE = "missingColumns"


@dataclass(frozen=True)
class Rule:
    """A named SQL boolean that is true for a bad record; `source` names where it came from."""

    name: str
    sql: str
    source: str = ""


@dataclass(frozen=True)
class RulePlan:
    """What the pass evaluates: the rules that bind, and what was left out and why."""

    rules: list[Rule] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing_columns: tuple[str, ...] = ()
    reject_all: bool = False  # reject_records and a declared column is missing

    @property
    def validates(self) -> bool:
        """Whether the pass computes `__rules` (and so writes `_rejected/`)."""
        return bool(self.rules) or self.reject_all


def rules_sql(plan: RulePlan) -> str:
    """The SELECT's `__rules` column: every rule a record breaks, so one record counts for each."""
    if not plan.validates:
        return ""
    cases = [f"CASE WHEN ({r.sql}) THEN {sql_string(r.name)} END" for r in plan.rules]
    if plan.reject_all:
        cases.insert(0, sql_string(MISSING_COLUMNS_RULE))
    return f", list_filter([{', '.join(cases)}], lambda x: x IS NOT NULL) AS __rules"


def _bind_error(conn: duckdb.DuckDBPyConnection, rules: list[Rule], placeholders: tuple[str, ...] = ()) -> str | None:
    """DuckDB's reason the rules do not bind against the file's shape, or None.

    `placeholders` are columns added as untyped NULLs: a rule that binds only with them
    needs exactly those columns, and nothing else is wrong with it. An untyped NULL
    casts implicitly to any type, so `"offerExpiry" < DATE '...'` and
    `regexp_full_match("promoCode", ...)` both bind against it.
    """
    extra = "".join(f", NULL AS {sql_identifier(c)}" for c in placeholders)
    try:
        conn.execute(f"SELECT {', '.join(f'({r.sql})' for r in rules)} FROM (SELECT *{extra} FROM {SHAPE_TABLE})")
    except duckdb.Error as exc:
        return duckdb_reason(exc)
    return None


def plan_rules(
    conn: duckdb.DuckDBPyConnection,
    source: Path,
    reader: str,
    path: Path,
    rules: list[Rule],
    required: tuple[str, ...],
    on_missing_columns: MissingColumnsPolicy,
) -> RulePlan:
    """Decide which rules the pass evaluates, before it starts; fail naming the rule file and rule.

    The file is sniffed once into an empty table of its columns and types (a LIMIT 0
    query: DuckDB samples the file, it does not scan it) and every rule is bound against
    that table. Binding against the reader instead would sniff the file again for each
    check: on a 3-million-row CSV sampled whole (the re-read after a type misfit) that is
    about 1 s per check, against 1 ms for a bind against the empty table.

    A rule is skipped only for a column the rule set declares under `columns`: a rule
    naming a column neither the file nor the rule set has is a typo, and fails the file.
    DuckDB matches column names without regard to case, and so does this check.
    """
    conn.execute(f"CREATE OR REPLACE TEMP TABLE {SHAPE_TABLE} AS SELECT * FROM {reader} LIMIT 0", [str(path)])
    present = {row[0].lower() for row in conn.execute(f"DESCRIBE {SHAPE_TABLE}").fetchall()}
    missing = tuple(c for c in required if c.lower() not in present)
    origin = rules[0].source.split(": rule")[0] if rules else "rule set"
    if missing and on_missing_columns == "fail":
        raise ConversionError(f"{source.name}: {origin} needs column(s) {', '.join(missing)}, which the file lacks")
    reject_all = bool(missing) and on_missing_columns == "reject_records"
    if not rules or _bind_error(conn, rules) is None:  # all rules bound at once, the common case
        return RulePlan(list(rules), {}, missing, reject_all)
    active: list[Rule] = []
    skipped: dict[str, str] = {}
    for rule in rules:
        if _bind_error(conn, [rule]) is None:
            active.append(rule)
            continue
        error = _bind_error(conn, [rule], missing)
        if error is not None:  # wrong even with every missing column supplied: the rule itself
            raise ConversionError(f"{source.name}: {rule.source or rule.name}: {error}")
        # The columns it cannot do without: it fails to bind when only that one is left out.
        needed = [c for c in missing if _bind_error(conn, [rule], tuple(m for m in missing if m != c)) is not None]
        needed = needed or list(missing)  # COALESCE("y", "z") needs either, so both are named
        skipped[rule.name] = f"missing column{'s' if len(needed) > 1 else ''} {', '.join(needed)}"
    return RulePlan(active, skipped, missing, reject_all)
