"""Tabular conversion: one pass, exact FIXED_COUNT chunks, one schema, safe XML."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.tabular import convert_to_parquet_chunks


def test_chunks_hold_exact_offsets_equal_to_the_source(tmp_path: Path) -> None:
    src = tmp_path / "p.csv"
    duckdb.execute(f"COPY (SELECT i AS id, 'n' || i AS name, CASE WHEN i > 110000 THEN NULL ELSE i * 0.5 END AS v FROM range(120001) t(i)) TO '{src}' (HEADER)")
    result = convert_to_parquet_chunks(src, "csv", tmp_path / "out", 50_000)
    assert result.record_count == 120_001
    assert [(c.start_offset, c.end_offset, c.record_count) for c in result.chunks] == [
        (0, 49_999, 50_000), (50_000, 99_999, 50_000), (100_000, 120_000, 20_001)
    ]
    schemas = {str(pq.read_schema(c.path)) for c in result.chunks}
    assert len(schemas) == 1
    for c in result.chunks:
        ids = [r[0] for r in duckdb.execute(f"SELECT id FROM read_parquet('{c.path}')").fetchall()]
        assert ids == list(range(c.start_offset, c.end_offset + 1))


def test_json_array_jsonl_and_tsv_convert(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"a": i, "b": str(i)} for i in range(5)]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"a": i}) + "\n" for i in range(7)))
    (tmp_path / "c.tsv").write_text("x\ty\n1\ta\n2\tb\n")
    assert convert_to_parquet_chunks(tmp_path / "a.json", "json", tmp_path / "o1", 2).record_count == 5
    assert len(convert_to_parquet_chunks(tmp_path / "a.json", "json", tmp_path / "o1b", 2).chunks) == 3
    assert convert_to_parquet_chunks(tmp_path / "b.jsonl", "jsonl", tmp_path / "o2", 100).record_count == 7
    result = convert_to_parquet_chunks(tmp_path / "c.tsv", "tsv", tmp_path / "o3", 100)
    assert result.columns[0][0] == "x" and result.record_count == 2


def test_xml_records_convert_and_entities_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "r.xml"
    good.write_text("<rows>" + "".join(f'<row id="{i}"><name>n{i}</name></row>' for i in range(4)) + "</rows>")
    result = convert_to_parquet_chunks(good, "xml", tmp_path / "o", 10)
    assert result.record_count == 4 and {c for c, _ in result.columns} == {"id", "name"}
    bad = tmp_path / "x.xml"
    bad.write_text('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]><r><row>&e;</row></r>')
    with pytest.raises(ConversionError, match="XML entities are forbidden"):
        convert_to_parquet_chunks(bad, "xml", tmp_path / "o2", 10)


def test_header_only_csv_has_no_chunks_and_ragged_csv_fails_with_duckdbs_reason(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,b\n")
    assert convert_to_parquet_chunks(tmp_path / "h.csv", "csv", tmp_path / "o", 10).chunks == []
    (tmp_path / "r.csv").write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(ConversionError, match="r.csv: .*(Error|error)"):
        convert_to_parquet_chunks(tmp_path / "r.csv", "csv", tmp_path / "o2", 10)


def test_compression_setting_is_written_into_the_parquet(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("a\n1\n2\n")
    for codec in ("ZSTD", "SNAPPY"):
        (chunk,) = convert_to_parquet_chunks(tmp_path / "c.csv", "csv", tmp_path / codec, 10, compression=codec).chunks
        assert pq.ParquetFile(chunk.path).metadata.row_group(0).column(0).compression == codec
