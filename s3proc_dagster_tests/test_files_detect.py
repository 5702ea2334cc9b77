"""Detection: the extension makes the claim, the magic number must confirm it."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest

from s3proc_dagster.errors import UnsupportedFileError
from s3proc_dagster.files.detect import HEAD_BYTES, Detection, detect
from s3proc_dagster.models import FileType


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(entries: dict[str, bytes], mode: str = "w") -> bytes:
    # the same bytes on every collection (a gzip header carries a time): pytest-xdist's
    # workers must collect the same test ids, and these bytes are in the ids
    if mode == "w:gz":
        return gzip.compress(tar_bytes(entries), mtime=0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.zip", zip_bytes({"x.csv": b"a\n"}), Detection(FileType.ARCHIVE, "zip", ".zip", "application/zip")),
        ("empty.zip", zip_bytes({}), Detection(FileType.ARCHIVE, "zip", ".zip", "application/zip")),
        ("a.tar", tar_bytes({"x": b"1"}), Detection(FileType.ARCHIVE, "tar", ".tar", "application/x-tar")),
        (
            "a.tar.gz",
            tar_bytes({"x": b"1"}, "w:gz"),
            Detection(FileType.ARCHIVE, "tar.gz", ".tar.gz", "application/gzip"),
        ),
        ("A.TGZ", tar_bytes({"x": b"1"}, "w:gz"), Detection(FileType.ARCHIVE, "tar.gz", ".tgz", "application/gzip")),
        ("a.csv.gz", gzip.compress(b"a,b\n", mtime=0), Detection(FileType.ARCHIVE, "gz", ".gz", "application/gzip")),
        ("a.csv", b"a,b\n1,2\n", Detection(FileType.DATABASE, "csv", ".csv", "text/csv")),
        ("a.tsv", b"a\tb\n", Detection(FileType.DATABASE, "tsv", ".tsv", "text/tab-separated-values")),
        ("a.json", b'  \n[{"a": 1}]', Detection(FileType.DATABASE, "json", ".json", "application/json")),
        ("a.jsonl", b'{"a": 1}\n', Detection(FileType.DATABASE, "jsonl", ".jsonl", "application/x-ndjson")),
        ("a.ndjson", b'{"a": 1}\n', Detection(FileType.DATABASE, "jsonl", ".ndjson", "application/x-ndjson")),
        ("a.xml", b"<?xml version='1.0'?><r/>", Detection(FileType.DATABASE, "xml", ".xml", "application/xml")),
        ("photo.png", b"\x89PNG\r\n\x1a\n", Detection(FileType.REGULAR, "regular", ".png", "image/png")),
        ("notes", b"anything", Detection(FileType.REGULAR, "regular", "", "application/octet-stream")),
    ],
)
def test_content_that_matches_its_name_is_classified_by_kind_type_and_mime(
    tmp_path: Path, name: str, data: bytes, expected: Detection
) -> None:
    assert detect(write(tmp_path / name, data)) == expected


def test_the_real_name_decides_when_the_path_is_a_staged_copy(tmp_path: Path) -> None:
    staged = write(tmp_path / "blob", b"a,b\n")

    assert detect(staged, "orders.csv").kind == "csv"


def test_regular_files_are_not_magic_checked(tmp_path: Path) -> None:
    assert detect(write(tmp_path / "model.bin", b"")).file_type is FileType.REGULAR


def test_a_utf8_bom_and_a_character_cut_at_the_8_kib_boundary_are_still_text(tmp_path: Path) -> None:
    body = b"\xef\xbb\xbfname\n" + b"a" * (HEAD_BYTES - 9) + "é".encode() + b"\n"
    assert body[HEAD_BYTES - 1 : HEAD_BYTES + 1] == "é".encode()  # the boundary splits the character

    assert detect(write(tmp_path / "bom.csv", body)).kind == "csv"


def test_json_starting_after_a_bom_is_json(tmp_path: Path) -> None:
    assert detect(write(tmp_path / "a.json", b'\xef\xbb\xbf\n {"a": 1}')).kind == "json"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "report.zip",
            b"hello, I am text",
            r"^report\.zip: named \.zip but is not a zip archive \(starts with b'hello, I am text'\)$",
        ),
        ("data.csv", bytes(range(256)), r"^data\.csv: named \.csv but content is binary \(NUL byte at offset 0\)"),
        (
            "latin1.csv",
            "name\ncafé\n".encode("latin-1"),
            r"named \.csv but content is not UTF-8 text \(byte 0xe9 at offset 8\)",
        ),
        ("a.csv.gz", b"a,b\n1,2\n", r"^a\.csv\.gz: named \.gz but is not gzip-compressed \(starts with b'a,b"),
        ("b.tgz", b"plain", r"named \.tgz but is not gzip-compressed"),
        (
            "c.tar.gz",
            gzip.compress(b"not a tar" * 100, mtime=0),
            r"named \.tar\.gz but its gzip data holds no tar archive",
        ),
        ("d.tar", gzip.compress(b"x", mtime=0), r"named \.tar but is not a tar archive \(starts with b'\\x1f\\x8b"),
        ("e.json", b"name,age\nann,3\n", r"^e\.json: named \.json but does not look like JSON \(starts with 'name,age"),
        ("f.json", b"   \n\t ", r"named \.json but does not look like JSON \(only whitespace\)"),
        ("g.jsonl", b"1\n2\n", r"named \.jsonl but does not look like JSON"),
        ("h.xml", b"{}", r"named \.xml but does not look like XML"),
    ],
)
def test_content_that_contradicts_its_name_is_rejected_saying_exactly_how(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    with pytest.raises(UnsupportedFileError, match=message):
        detect(write(tmp_path / name, data))


def test_a_truncated_tgz_is_rejected_as_unreadable_gzip(tmp_path: Path) -> None:
    data = tar_bytes({"x": b"1" * 5000}, "w:gz")[:20]

    with pytest.raises(UnsupportedFileError, match=r"named \.tgz but its gzip data cannot be read"):
        detect(write(tmp_path / "cut.tgz", data))


@pytest.mark.parametrize("name", ["empty.csv", "empty.json", "empty.zip", "empty.gz"])
def test_an_empty_file_with_a_known_extension_is_rejected_as_empty(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsupportedFileError, match=rf"^{re.escape(name)}: file is empty$"):
        detect(write(tmp_path / name, b""))
