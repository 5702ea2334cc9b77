"""Safe extraction: hostile entries and bombs fail cleanly, good archives keep their structure."""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from s3proc_dagster.errors import UnsafeArchiveError, UnsupportedFileError
from s3proc_dagster.files.archives import ExtractedEntry, ExtractionLimits, extract

MiB = 1 << 20


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def tar_member(
    name: str, data: bytes = b"", type: bytes = tarfile.REGTYPE, linkname: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = type
    info.linkname = linkname
    info.size = len(data) if type == tarfile.REGTYPE else 0
    return info, data


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def make_pax_tar(
    path: Path,
    members: list[tuple[str, bytes, dict[str, str]]],
    mode: str = "w",
    global_headers: dict[str, str] | None = None,
) -> Path:
    """A POSIX.1-2001 tar: each entry (name, data, its PAX records), after an optional global header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT, pax_headers=global_headers) as tf:  # type: ignore[call-overload]
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax
            tf.addfile(info, io.BytesIO(data))
    return path


def leftovers(folder: Path) -> list[str]:
    """Everything under `folder`: after a failed extraction it must hold nothing new."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def summary(entries: list[ExtractedEntry], dest: Path) -> list[tuple[str, int, bytes]]:
    for entry in entries:
        assert entry.path == dest / entry.relative_path
    return [(e.relative_path, e.size, e.path.read_bytes()) for e in entries]


# ---- happy paths -------------------------------------------------------------------------------


def test_zip_entries_are_extracted_with_nested_folders_preserved(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "in" / "bundle.zip",
        [("top.csv", b"a,b\n"), ("x/y/deep.json", b"[]"), ("x/empty/", b"")],
    )
    dest = tmp_path / "out" / "bundle"

    entries = extract(archive, "zip", dest)

    assert summary(entries, dest) == [("top.csv", 4, b"a,b\n"), ("x/y/deep.json", 2, b"[]")]
    assert (dest / "x" / "empty").is_dir()


@pytest.mark.parametrize(
    ("name", "kind", "mode"), [("b.tar", "tar", "w"), ("b.tar.gz", "tar.gz", "w:gz"), ("b.tgz", "tar.gz", "w:gz")]
)
def test_tar_tar_gz_and_tgz_keep_their_inner_structure(tmp_path: Path, name: str, kind: str, mode: str) -> None:
    big = os.urandom(2 * MiB + 5)  # several copy blocks; random, so no ratio limit applies
    archive = make_tar(
        tmp_path / "in" / name,
        [
            tar_member("./data", type=tarfile.DIRTYPE),
            tar_member("./data/one.csv", b"a\n1\n"),
            tar_member("data/sub/big.bin", big),
        ],
        mode,
    )
    dest = tmp_path / "out"

    entries = extract(archive, kind, dest)

    assert summary(entries, dest) == [("data/one.csv", 4, b"a\n1\n"), ("data/sub/big.bin", len(big), big)]


def test_gz_holds_one_entry_named_as_the_archive_without_gz(tmp_path: Path) -> None:
    archive = tmp_path / "orders.csv.gz"
    archive.write_bytes(gzip.compress(b"id,qty\n1,2\n"))

    entries = extract(archive, "gz", tmp_path / "out")

    assert summary(entries, tmp_path / "out") == [("orders.csv", 11, b"id,qty\n1,2\n")]


def test_macos_junk_is_skipped(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "mac.zip",
        [
            ("a.csv", b"x\n"),
            ("__MACOSX/._a.csv", b"\0\5\26\7"),
            (".DS_Store", b"bud1"),
            ("sub/.DS_Store", b"bud1"),
            ("sub/._b.csv", b"\0"),
        ],
    )
    dest = tmp_path / "out"

    entries = extract(archive, "zip", dest)

    assert [e.relative_path for e in entries] == ["a.csv"]
    assert leftovers(dest) == ["a.csv"]


def test_extracting_again_replaces_the_earlier_result_whole(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", [("a.csv", b"x\n")])
    dest = tmp_path / "out"
    extract(archive, "zip", dest)
    (dest / "stale-from-a-crashed-run.csv").write_bytes(b"old")

    entries = extract(archive, "zip", dest)

    assert [e.relative_path for e in entries] == ["a.csv"]
    assert leftovers(dest) == ["a.csv"]


def test_a_small_archive_of_repetitive_text_is_not_mistaken_for_a_bomb(tmp_path: Path) -> None:
    text = b"same,row,again\n" * 50_000  # 750 KB that deflates far beyond 200x
    archive = make_zip(tmp_path / "rep.zip", [("rep.csv", text)])
    assert len(text) / archive.stat().st_size > 200

    entries = extract(archive, "zip", tmp_path / "out")

    assert entries[0].size == len(text)


# ---- hostile names -----------------------------------------------------------------------------


def test_zip_slip_entry_is_rejected_and_nothing_written_outside(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "in" / "report.zip", [("fine.csv", b"a\n"), ("../evil", b"pwned")])
    dest = tmp_path / "out" / "report"

    with pytest.raises(UnsafeArchiveError, match=r"^report\.zip: entry '\.\./evil': path contains '\.\.'"):
        extract(archive, "zip", dest)

    assert not (tmp_path / "out" / "evil").exists()
    assert leftovers(tmp_path / "out") == []  # not even the good entry that came first


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("..\\evil", "path contains '..'"),
        ("C:\\Windows\\evil.dll", "absolute path"),
        ("\\evil", "absolute path"),
        ("/etc/evil", "absolute path"),
    ],
)
def test_windows_and_posix_escapes_in_zip_names_are_rejected(tmp_path: Path, name: str, why: str) -> None:
    archive = make_zip(tmp_path / "w.zip", [(name, b"x")])

    with pytest.raises(UnsafeArchiveError, match=re.escape(why)):
        extract(archive, "zip", tmp_path / "out" / "w")

    assert leftovers(tmp_path / "out") == []


def test_absolute_path_tar_entry_is_rejected_and_not_written_there(tmp_path: Path) -> None:
    target = tmp_path / "victim" / "evil.sh"
    archive = make_tar(tmp_path / "abs.tar", [tar_member(str(target), b"rm -rf /")])

    with pytest.raises(UnsafeArchiveError, match=rf"^abs\.tar: entry '{re.escape(str(target))}': absolute path"):
        extract(archive, "tar", tmp_path / "out" / "abs")

    assert not target.exists()
    assert leftovers(tmp_path / "out") == []


# ---- links and special files -------------------------------------------------------------------


def test_symlink_entry_in_a_tar_is_rejected(tmp_path: Path) -> None:
    link = tar_member("passwd", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    archive = make_tar(tmp_path / "l.tar.gz", [link], "w:gz")

    with pytest.raises(UnsafeArchiveError, match=r"entry 'passwd': is a link"):
        extract(archive, "tar.gz", tmp_path / "out" / "l")

    assert leftovers(tmp_path / "out") == []


def test_symlink_entry_in_a_zip_is_rejected(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("shortcut")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "l.zip", [(link, b"../../etc/passwd")])

    with pytest.raises(UnsafeArchiveError, match=r"entry 'shortcut': is a link"):
        extract(archive, "zip", tmp_path / "out" / "l")

    assert leftovers(tmp_path / "out") == []


def test_hard_link_entry_is_rejected_even_when_it_points_inside(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "h.tar",
        [tar_member("data.csv", b"a\n"), tar_member("copy.csv", type=tarfile.LNKTYPE, linkname="data.csv")],
    )

    with pytest.raises(UnsafeArchiveError, match=r"entry 'copy\.csv': is a link"):
        extract(archive, "tar", tmp_path / "out" / "h")

    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("type", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_device_and_fifo_entries_are_rejected(tmp_path: Path, type: bytes) -> None:
    archive = make_tar(tmp_path / "d.tar", [tar_member("dev/null", type=type)])

    with pytest.raises(UnsafeArchiveError, match=r"entry 'dev/null': is a device file or FIFO"):
        extract(archive, "tar", tmp_path / "out" / "d")

    assert leftovers(tmp_path / "out") == []


def test_two_entries_with_the_same_path_are_rejected(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "dup.zip", [("a.csv", b"1\n"), ("./a.csv", b"2\n")])

    with pytest.raises(UnsafeArchiveError, match=r"clashes with another entry"):
        extract(archive, "zip", tmp_path / "out" / "dup")


# ---- limits ------------------------------------------------------------------------------------


def test_zip_bomb_fails_on_the_ratio_limit_early_and_leaves_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "in" / "bomb.zip"
    archive.parent.mkdir()
    zeros = bytes(MiB)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.bin", "w", force_zip64=True) as out:
        for _ in range(200):
            out.write(zeros)
    out_dir = tmp_path / "out"

    bomb = r"^bomb\.zip: entry 'zeros\.bin': .*max_ratio, possible zip bomb\); stopped after ([\d,]+) bytes written$"
    with pytest.raises(UnsafeArchiveError, match=bomb) as caught:
        extract(archive, "zip", out_dir / "bomb")

    written = int(re.findall(bomb, str(caught.value))[0].replace(",", ""))
    assert written <= 200 * archive.stat().st_size < 50 * MiB  # stopped at the limit, long before 200 MB
    assert leftovers(out_dir) == []


def test_total_size_limit_counts_bytes_written_across_entries(tmp_path: Path) -> None:
    # a zip: tarfile's reads (headers, padding, 10 KiB records) would trip the limit first
    archive = make_zip(tmp_path / "t.zip", [("a.bin", b"a" * 600), ("b.bin", b"b" * 600)])
    limits = ExtractionLimits(max_total_bytes=1000)

    too_big = r"entry 'b\.bin': archive expands to more than 1,000 bytes \(max_total_bytes\); stopped after 600 "
    with pytest.raises(UnsafeArchiveError, match=too_big):
        extract(archive, "zip", tmp_path / "out" / "t", limits)

    assert leftovers(tmp_path / "out") == []


def test_entry_count_limit_allows_exactly_the_limit_and_rejects_one_more(tmp_path: Path) -> None:
    limits = ExtractionLimits(max_entries=10)
    ten = make_zip(tmp_path / "ten.zip", [(f"f{i}.txt", b"x") for i in range(10)])
    eleven = make_zip(tmp_path / "eleven.zip", [(f"f{i}.txt", b"x") for i in range(11)])

    assert len(extract(ten, "zip", tmp_path / "out" / "ten", limits)) == 10
    with pytest.raises(  # counted in the central directory, before zipfile builds an object per entry
        UnsafeArchiveError, match=r"^eleven\.zip: its central directory lists more than 10 entries \(max_entries\)"
    ):
        extract(eleven, "zip", tmp_path / "out" / "eleven", limits)
    assert not (tmp_path / "out" / "eleven").exists()


# ---- tar headers: tarfile reads their payload into memory, so they are bounded before it does ---


@pytest.mark.parametrize(("name", "kind", "mode"), [("pax.tar", "tar", "w"), ("pax.tar.gz", "tar.gz", "w:gz")])
def test_a_64_mib_pax_header_is_refused_before_it_is_read(tmp_path: Path, name: str, kind: str, mode: str) -> None:
    archive = make_pax_tar(tmp_path / "in" / name, [("a.csv", b"a\n1\n", {"comment": "x" * (64 * MiB)})], mode)

    refused = rf"^{re.escape(name)}: PAX extended header \(type 'x'\) at byte 0 declares 67,108,\d\d\d bytes, "
    with pytest.raises(UnsafeArchiveError, match=refused + r"over the 1,048,576 allowed \(max_header_bytes\)"):
        extract(archive, kind, tmp_path / "out" / "pax")

    assert leftovers(tmp_path / "out") == []


def test_a_gnu_long_name_over_the_cap_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "long.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("d/" * 600_000 + "a.csv"))  # a 1.2 MB name
    assert archive.read_bytes()[:13] == b"././@LongLink"  # the name went into an L header

    with pytest.raises(UnsafeArchiveError, match=r"^long\.tar: GNU long-name header \(type 'L'\) at byte 0 declares"):
        extract(archive, "tar", tmp_path / "out" / "long")

    assert leftovers(tmp_path / "out") == []


def test_headers_held_at_once_count_together_against_the_cap(tmp_path: Path) -> None:
    """A global header stays in memory to the end, so it and an entry's own header add up."""
    archive = make_pax_tar(
        tmp_path / "two.tar",
        [("a.csv", b"a\n", {"comment": "e" * 600_000})],
        global_headers={"comment": "g" * 600_000},
    )

    with pytest.raises(
        UnsafeArchiveError, match=r"PAX extended header .* headers held at once reach 1,200,0\d\d bytes"
    ):
        extract(archive, "tar", tmp_path / "out" / "two")

    assert leftovers(tmp_path / "out") == []


def test_header_bytes_count_toward_max_total_bytes(tmp_path: Path) -> None:
    members = [(f"f{i}.csv", b"a\n", {"comment": "c" * 500_000}) for i in range(12)]  # each well under the cap
    archive = make_pax_tar(tmp_path / "many.tar.gz", members, "w:gz")
    limits = ExtractionLimits(max_total_bytes=4 * MiB, max_ratio=10_000)  # 24 bytes of data, 6 MB of headers

    too_long = r"^many\.tar\.gz: tar stream is longer than 4,194,304 bytes \(max_total_bytes, which counts tar headers"
    with pytest.raises(UnsafeArchiveError, match=too_long):
        extract(archive, "tar.gz", tmp_path / "out" / "many", limits)

    assert leftovers(tmp_path / "out") == []


def test_header_bytes_count_toward_the_ratio_limit(tmp_path: Path) -> None:
    members = [(f"f{i}.csv", b"a\n", {"comment": "c" * 900_000}) for i in range(4)]
    archive = make_pax_tar(tmp_path / "pad.tar.gz", members, "w:gz")
    assert archive.stat().st_size * 200 < 3.6e6  # the headers alone are far past 200 times the archive

    with pytest.raises(UnsafeArchiveError, match=r"^pad\.tar\.gz: tar stream expands to more than 200 times"):
        extract(archive, "tar.gz", tmp_path / "out" / "pad")

    assert leftovers(tmp_path / "out") == []


def sparse_gnu(path: Path) -> Path:
    return make_tar(path, [tar_member("holes.bin", type=tarfile.GNUTYPE_SPARSE)])


def sparse_pax(path: Path) -> Path:
    sparse = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "holes.bin"}
    return make_pax_tar(path, [("GNUSparseFile.0/holes.bin", b"1\n0\n", sparse)])


@pytest.mark.parametrize("make", [sparse_gnu, sparse_pax])
def test_a_sparse_entry_is_refused_because_its_map_is_read_into_memory(tmp_path: Path, make) -> None:
    archive = make(tmp_path / "sparse.tar")

    with pytest.raises(UnsafeArchiveError, match=r"^sparse\.tar: entry '.*holes\.bin': is a sparse file"):
        extract(archive, "tar", tmp_path / "out" / "sparse")

    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("format", "mode"), [(tarfile.PAX_FORMAT, "w"), (tarfile.PAX_FORMAT, "w:gz"), (tarfile.GNU_FORMAT, "w")]
)
def test_ordinary_pax_and_gnu_long_names_still_extract(tmp_path: Path, format: int, mode: str) -> None:
    name = "données/" + "é" * 120 + "/" + "ü" * 100 + ".csv"  # past ustar's 100 and 155 bytes: a PAX path or an L
    archive = tmp_path / "names.tar"
    with tarfile.open(archive, mode, format=format) as tf:  # type: ignore[call-overload]
        info = tarfile.TarInfo(name)
        info.size = 4
        info.mtime = 1_700_000_000.25  # fractional: a PAX mtime record too
        tf.addfile(info, io.BytesIO(b"a\n1\n"))
    kind = "tar.gz" if mode == "w:gz" else "tar"

    entries = extract(archive, kind, tmp_path / "out")

    assert summary(entries, tmp_path / "out") == [(name, 4, b"a\n1\n")]


@pytest.mark.parametrize(("name", "kind"), [("m.tar.gz", "tar.gz"), ("m.zip", "zip"), ("m.csv.gz", "gz")])
def test_extracted_files_are_readable_by_their_owner_only(tmp_path: Path, name: str, kind: str) -> None:
    archive = tmp_path / name
    if kind == "tar.gz":
        make_tar(archive, [tar_member("a.csv", b"a\n"), tar_member("sub/b.csv", b"b\n")], "w:gz")
    elif kind == "zip":
        make_zip(archive, [("a.csv", b"a\n"), ("sub/b.csv", b"b\n")])
    else:
        archive.write_bytes(gzip.compress(b"a\n"))
    previous = os.umask(0o022)  # the usual umask, under which open() makes files 0644
    try:
        entries = extract(archive, kind, tmp_path / "out")
    finally:
        os.umask(previous)

    assert entries
    assert {e.relative_path: stat.S_IMODE(e.path.stat().st_mode) for e in entries} == {
        e.relative_path: 0o600 for e in entries
    }


# ---- unreadable input --------------------------------------------------------------------------


def test_a_truncated_tar_gz_is_unsupported_not_half_extracted(tmp_path: Path) -> None:
    whole = make_tar(tmp_path / "whole.tar.gz", [tar_member("a.bin", bytes(range(256)) * 400)], "w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(UnsupportedFileError, match=r"^cut\.tar\.gz: cannot be read as tar\.gz"):
        extract(cut, "tar.gz", tmp_path / "out" / "cut")

    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(("name", "kind"), [("fake.tar.gz", "tar.gz"), ("fake.tar", "tar")])
def test_bytes_that_are_not_a_tar_are_unsupported(tmp_path: Path, name: str, kind: str) -> None:
    archive = tmp_path / name
    archive.write_bytes(b"hello, I am not a tar\n" * 100)

    with pytest.raises(UnsupportedFileError, match=rf"^{re.escape(name)}: cannot be read as {re.escape(kind)}"):
        extract(archive, kind, tmp_path / "out" / "fake")

    assert leftovers(tmp_path / "out") == []


def test_a_bzip2_zip_entry_is_refused_because_it_cannot_be_streamed_with_bounded_memory(tmp_path: Path) -> None:
    archive = tmp_path / "bz.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("a.csv", b"a\n")

    with pytest.raises(UnsupportedFileError, match=r"entry 'a\.csv' uses compression method 12"):
        extract(archive, "zip", tmp_path / "out" / "bz")


def test_an_unknown_kind_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an archive kind: 'rar'"):
        extract(tmp_path / "x.rar", "rar", tmp_path / "out")
