"""XML to CSV, so that an XML file is typed, validated and chunked like any CSV.

XML has no DuckDB reader: it is streamed through defusedxml into JSON lines, rewritten by
DuckDB as CSV and then read like any CSV (`tabular.py`), so its values are typed by the
same sniffer.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree.ElementTree import Element

import duckdb

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.sql import duckdb_reason, sql_string


def _local(name: str) -> str:
    """`{namespace}tag` -> `tag`: a column name should not carry a URI."""
    return name.rsplit("}", 1)[-1]


def _xml_record(elem: Element) -> dict[str, str | None]:
    """Attributes and child elements (one level) of a record element become its columns."""
    record: dict[str, str | None] = {_local(k): v for k, v in elem.attrib.items()}
    children = list(elem)
    for child in children:
        text = (child.text or "").strip()
        record[_local(child.tag)] = text or None
    if not children and not record:
        record[_local(elem.tag)] = (elem.text or "").strip() or None
    return record


def xml_to_jsonl(source: Path, target: Path) -> list[str]:
    """Stream an XML file's records (the repeated children of its root) to JSON lines.

    Returns every column seen, in first-seen order (empty: no records). Parsed with
    defusedxml: a DTD entity or external reference is refused, so a file can neither read
    local files (XXE) nor expand itself a billion times. Each record is dropped from the
    tree once written, so memory does not grow with the file.
    """
    from defusedxml import DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
    from defusedxml.ElementTree import iterparse

    columns: dict[str, None] = {}
    try:
        with target.open("w", encoding="utf-8") as out:
            events = iterparse(str(source), events=("start", "end"), forbid_dtd=False)
            _, root = next(events)  # the root's start; records are its children
            depth = 1
            for event, elem in events:
                if event == "start":
                    depth += 1
                    continue
                depth -= 1
                if depth != 1:
                    continue
                record = _xml_record(elem)
                columns.update(dict.fromkeys(record))
                out.write(json.dumps(record) + "\n")
                root.clear()
    except (EntitiesForbidden, ExternalReferenceForbidden, DTDForbidden) as exc:
        raise ConversionError(f"{source.name}: XML entities are forbidden ({type(exc).__name__})") from None
    except OSError:
        raise
    except Exception as exc:
        raise ConversionError(f"{source.name}: not well-formed XML ({exc})") from None
    return list(columns)


def xml_as_csv(conn: duckdb.DuckDBPyConnection, source: Path, scratch: Path) -> Path | None:
    """XML -> JSON lines -> CSV, so that the CSV sniffer types the values (all text in XML).

    JSON would keep "42" a string. The JSON lines are read with every column named
    explicitly, so a column that first appears late in the file is not lost to sampling.
    """
    jsonl, target = scratch / "xml.jsonl", scratch / "xml.csv"
    columns = xml_to_jsonl(source, jsonl)
    if not columns:
        return None
    struct = "{" + ", ".join(f"{sql_string(c)}: 'VARCHAR'" for c in columns) + "}"
    try:
        conn.execute(
            f"COPY (SELECT * FROM read_json($1, format = 'newline_delimited', columns = {struct})) "
            f"TO {sql_string(str(target))} (FORMAT csv, HEADER, DELIMITER ',', QUOTE '\"')",
            [str(jsonl)],
        )
    except duckdb.Error as exc:
        raise ConversionError(f"{source.name}: {duckdb_reason(exc)}") from None
    jsonl.unlink()
    return target
