"""Record validation rule sets: `dbt_like_sql/validations/<set>.yml` beside plain `.sql` rules.

A rule set selects files by path glob and names rules; each rule is one DuckDB boolean
over a record's columns, TRUE for a bad record, evaluated inside the conversion's single
pass (see `rules.py`). Rule SQL is rendered with Jinja (`{{ as_of }}`), the way dbt
users write their models. A rule set that does not parse fails the file with a message
naming the rule file; so does a rule that does not bind for any reason but a missing
declared column.

`on_missing_columns` is the rule set's schema contract for a file it selects that lacks
a declared column: `fail` it, `skip_rules` (the default: the rules needing the column do
not run, the others do) or `reject_records` (every record to `_rejected/` as
`missingColumns`). A name glob cannot tell a promotions file from another file named
`promo_...`, so failing such a file by default would punish a name, not bad data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import jinja2
import yaml

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.globs import path_matches
from s3proc_dagster.files.rules import (
    DEFAULT_MISSING_COLUMNS,
    MISSING_COLUMNS_POLICIES,
    MISSING_COLUMNS_RULE,
    MissingColumnsPolicy,
    Rule,
)
from s3proc_dagster.settings import DEFAULT_RULES_DIR


class RuleSetError(ConversionError):
    """A rule set cannot be used: bad YAML, a missing rule file, a rule that does not bind."""


@dataclass(frozen=True)
class RuleSet:
    name: str
    path: Path
    select: tuple[str, ...]
    columns: tuple[str, ...]
    rules: tuple[tuple[str, Path], ...]
    on_missing_columns: MissingColumnsPolicy = DEFAULT_MISSING_COLUMNS

    def selects(self, relative_path: str) -> bool:
        return any(path_matches(relative_path, pattern) for pattern in self.select)

    def render(self, as_of: date) -> list[Rule]:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        rendered = []
        for name, sql_path in self.rules:
            try:
                sql = env.from_string(sql_path.read_text()).render(as_of=as_of.isoformat()).strip()
            except (OSError, jinja2.TemplateError) as exc:
                raise RuleSetError(f"{self.path.name}: rule {name} ({sql_path.name}): {exc}") from None
            if not sql or sql.rstrip().endswith(";"):
                raise RuleSetError(f"{self.path.name}: rule {name} ({sql_path.name}): must be one SQL expression")
            rendered.append(Rule(name=name, sql=sql, source=f"{self.path.name}: rule {name} ({sql_path.name})"))
        return rendered


def _load(path: Path) -> RuleSet:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RuleSetError(f"{path.name}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), dict) or not doc.get("select"):
        raise RuleSetError(f"{path.name}: needs `select` (globs) and `rules` (name: file.sql)")
    select = doc["select"] if isinstance(doc["select"], list) else [doc["select"]]
    on_missing = doc.get("on_missing_columns", DEFAULT_MISSING_COLUMNS)
    if on_missing not in MISSING_COLUMNS_POLICIES:
        raise RuleSetError(
            f"{path.name}: on_missing_columns must be one of {', '.join(MISSING_COLUMNS_POLICIES)}, not {on_missing!r}"
        )
    rules = []
    for name, file in doc["rules"].items():
        if not str(name).isidentifier():
            raise RuleSetError(f"{path.name}: rule name {name!r} must be an identifier")
        if name == MISSING_COLUMNS_RULE:
            raise RuleSetError(f"{path.name}: rule name {name!r} is reserved for records of a file lacking a column")
        rules.append((str(name), (path.parent / str(file)).resolve()))
    return RuleSet(
        name=str(doc.get("name") or path.stem),
        path=path,
        select=tuple(str(s) for s in select),
        columns=tuple(str(c) for c in doc.get("columns") or ()),
        rules=tuple(rules),
        on_missing_columns=on_missing,
    )


def rule_set_for(relative_path: str, rules_dir: Path = DEFAULT_RULES_DIR) -> RuleSet | None:
    """The first rule set (by file name) that selects this path, or None: not validated.

    Every rule set in the folder is parsed, so a broken one is reported even when it
    would not have selected this file: a typo should not wait for its first match.
    """
    if not rules_dir.is_dir():
        return None
    found = None
    for path in sorted(rules_dir.glob("*.yml")) + sorted(rules_dir.glob("*.yaml")):
        rule_set = _load(path)
        if found is None and rule_set.selects(relative_path):
            found = rule_set
    return found


def as_of_date(value: str | None) -> date:
    """VALIDATION_AS_OF, or today in UTC."""
    if value:
        return date.fromisoformat(value)
    return datetime.now(UTC).date()
