"""A dbt-shaped project: models/*.sql (one SELECT each) and models/schema.yml.

`{{ ref('m') }}` and `{{ source('progress', 't') }}` are Jinja calls, rendered by Jinja,
never matched by regex: rendering once with recording functions gives each model's
dependencies (the DAG), rendering again gives the SQL that runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import jinja2
import yaml

from s3proc_dagster.errors import S3ProcError


class ReportProjectError(S3ProcError):
    """The project cannot be loaded: bad YAML, an unknown ref or source, a cycle."""


@dataclass(frozen=True)
class ColumnTest:
    model: str
    column: str
    kind: str  # not_null | unique | accepted_values | relationships
    values: tuple[str, ...] = ()
    to_model: str | None = None
    to_field: str | None = None

    @property
    def name(self) -> str:
        target = f"_{self.to_model}" if self.to_model else ""
        return f"{self.column}_{self.kind}{target}"


@dataclass
class Model:
    name: str
    path: Path
    template: str
    description: str = ""
    refs: set[str] = field(default_factory=set)
    sources: set[tuple[str, str]] = field(default_factory=set)
    tests: list[ColumnTest] = field(default_factory=list)


def source_table(source: str, table: str) -> str:
    return f"{source}__{table}"


@dataclass
class Project:
    root: Path
    models: dict[str, Model]
    sources: dict[str, dict[str, str]]  # source -> table -> description

    def order(self) -> list[str]:
        try:
            return list(TopologicalSorter({n: m.refs for n, m in self.models.items()}).static_order())
        except CycleError as exc:
            raise ReportProjectError(f"models form a cycle: {exc.args[1]}") from None

    def render(self, name: str) -> str:
        return _env().from_string(self.models[name].template).render(ref=lambda model: model, source=source_table)


def _env() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


def _tests(model: str, columns: list[dict]) -> list[ColumnTest]:
    out = []
    for column in columns or []:
        for test in column.get("tests", []) or []:
            if isinstance(test, str):
                out.append(ColumnTest(model, column["name"], test))
                continue
            ((kind, args),) = test.items()
            if kind == "accepted_values":
                out.append(ColumnTest(model, column["name"], kind, values=tuple(str(v) for v in args["values"])))
            elif kind == "relationships":
                target = _env().from_string("{{ " + args["to"] + " }}").render(ref=lambda m: m, source=source_table)
                out.append(ColumnTest(model, column["name"], kind, to_model=target, to_field=args["field"]))
            else:
                raise ReportProjectError(f"schema.yml: model {model}, column {column['name']}: unknown test {kind!r}")
    return out


def load_project(root: Path) -> Project:
    schema_path = root / "models" / "schema.yml"
    try:
        schema = yaml.safe_load(schema_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ReportProjectError(f"{schema_path.name}: {' '.join(str(exc).split())}") from None
    sources = {
        s["name"]: {t["name"]: t.get("description", "") for t in s.get("tables", [])} for s in schema.get("sources", [])
    }
    described = {m["name"]: m for m in schema.get("models", [])}
    models: dict[str, Model] = {}
    for path in sorted((root / "models").glob("*.sql")):
        model = Model(path.stem, path, path.read_text())
        spec = described.get(model.name, {})
        model.description = spec.get("description", "")
        model.tests = _tests(model.name, spec.get("columns", []))

        def ref(name: str, _m: Model = model) -> str:
            _m.refs.add(name)
            return name

        def source(src: str, table: str, _m: Model = model) -> str:
            _m.sources.add((src, table))
            return source_table(src, table)

        try:
            _env().from_string(model.template).render(ref=ref, source=source)
        except jinja2.TemplateError as exc:
            raise ReportProjectError(f"{path.name}: {exc}") from None
        models[model.name] = model
    for model in models.values():
        for name in model.refs:
            if name not in models:
                raise ReportProjectError(f"{model.path.name}: ref('{name}') names no model")
        for src, table in model.sources:
            if table not in sources.get(src, {}):
                raise ReportProjectError(f"{model.path.name}: source('{src}', '{table}') is not declared in schema.yml")
    return Project(root, models, sources)
