"""Bad input: each file converts correctly or ends FAILED with a reason; originals kept."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks.support import Deployment, csv_bytes, list_keys, promo_rows
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.zones.declared import declared
from s3proc_dagster_tests.pipeline_helpers import (
    COMMAND_DIR,
    execute,
    read_dataset,
    run_requests_under,
    sensor_tick,
    write_tar_gz,
    write_zip,
)


def tar_with(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w:gz") as tf:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data) if data else None)


def zip_slip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.csv", "a\n1\n")
        zf.writestr("../../evil.csv", "a\n1\n")


def zip_bomb(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf, zf.open("zeros.csv", "w") as member:
        block = b"0" * (1 << 20)
        for _ in range(300):  # 300 MB of one byte: a ratio far beyond any real file
            member.write(block)


PAX_BOMB = {"comment": "x" * (64 << 20)}  # 64 MiB of PAX record, which gzip makes 65 KB


def abs_tar(path: Path) -> None:
    tar_with(path, tarfile.TarInfo("/tmp/s3proc-abs-evil.csv"), b"a\n1\n")


def files_only_in_name(path: Path) -> None:
    """A zip of nothing but folders and Finder metadata: no file to upload."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/", b"")
        zf.writestr("__MACOSX/._data", b"\x00\x05\x16\x07")


def long_entry_name(path: Path) -> None:
    """A GNU tar entry whose name (300 bytes, one component) no Linux file system can hold."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("L" * 296 + ".csv")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"a\n1\n"))


def symlink_tar(path: Path) -> None:
    info = tarfile.TarInfo("link.csv")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    tar_with(path, info)


XXE = """<?xml version="1.0"?>
<!DOCTYPE rows [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<rows><row><id>&xxe;</id></row></rows>
"""

BAD = {
    "slip.zip": (zip_slip, "evil"),
    "abs.tar.gz": (abs_tar, "s3proc-abs-evil"),
    "symlink.tgz": (symlink_tar, "link"),
    "bomb.zip": (zip_bomb, "ratio"),
    "paxbomb.tar.gz": (lambda p: write_tar_gz(p, {"a.csv": b"a\n1\n"}, PAX_BOMB), "pax extended header"),
    "xxe.xml": (lambda p: p.write_text(XXE), "entit"),
    "text.zip": (lambda p: p.write_text("hello, I am not a zip"), "not a zip"),
    "nothing.zip": (lambda p: zipfile.ZipFile(p, "w").close(), "the archive holds no files"),
    "folders.zip": (files_only_in_name, "the archive holds no files"),
    "longname.tar.gz": (long_entry_name, "a name in its path is longer than the file system allows"),
    "empty.csv": (lambda p: p.write_bytes(b""), "empty"),
    "binary.csv": (lambda p: p.write_bytes(bytes(range(256)) * 8), "binary"),
    "ragged.csv": (lambda p: p.write_text("a,b\n1,2\n3,4,5,6\n7\n"), "ragged.csv"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_fails_with_reason_and_original_moved_unchanged(deployment: Deployment, name: str) -> None:
    make, reason = BAD[name]
    folder = f"bad-{name.replace('.', '-')}"
    path = deployment.watch / folder / name
    path.parent.mkdir(parents=True)
    make(path)
    original = path.read_bytes()
    (request,) = run_requests_under(sensor_tick(deployment), folder)
    result = execute(request, deployment)
    assert not result.success
    record = deployment.store().get_by_path(str(path))
    assert record.status is S.FAILED
    assert reason in record.error_details.lower() or reason in record.error_details
    assert deployment.env["STAGING_DIRECTORY"] not in record.error_details  # names the user's file, not a copy
    moved = deployment.errors / folder / name
    assert not path.exists() and moved.read_bytes() == original
    error_json = json.loads(moved.with_name(name + ".error.json").read_text())
    assert error_json["fileId"] == record.file_id and error_json["error"]
    assert not (deployment.root / "evil.csv").exists() and not Path("/tmp/s3proc-abs-evil.csv").exists()


def test_an_archive_with_one_bad_entry_fails_every_entry_saying_the_archive_failed(deployment: Deployment) -> None:
    folder = "bad-entry-archive"
    path = deployment.watch / folder / "mixed.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.csv", "a,b\n1,2\n")
        archive.writestr("bad.csv", "a,b\n1,2\n3,4,5,6\n7\n")
    (request,) = run_requests_under(sensor_tick(deployment), folder)
    assert not execute(request, deployment).success
    store = deployment.store()
    good = store.get_by_path(f"{path}!/good.csv")
    assert good.status is S.FAILED and good.error_details.startswith("its archive mixed.zip failed: ")
    assert "bad.csv" in good.error_details  # which entry broke it
    assert store.get_by_path(str(path)).status is S.FAILED


def process_measured(path: Path) -> tuple[int, str, int]:
    """`s3proc process PATH` as a user runs it; its exit status, output, and peak RSS in bytes.

    The command runs under a small Python parent that reports RUSAGE_CHILDREN: the kernel's
    own high-water mark of that one command and whatever it waited for, so no peak falls
    between two samples and no earlier child of the test session is counted.
    """
    report = (
        "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", report, sys.executable, "-m", "s3proc_dagster.cli", "process", str(path)],
        cwd=COMMAND_DIR,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    *_, peak_kib = done.stderr.split()
    return done.returncode, done.stdout + done.stderr, int(peak_kib) * 1024  # ru_maxrss is KiB on Linux


def test_a_pax_header_bomb_fails_untouched_with_nothing_in_s3_and_costs_no_more_memory_than_its_entries(
    deployment: Deployment,
) -> None:
    entries = {"promo.csv": csv_bytes(promo_rows(2000))}
    plain = write_tar_gz(deployment.watch / "pax-bomb" / "plain.tar.gz", entries)
    bomb = write_tar_gz(deployment.watch / "pax-bomb" / "bomb.tar.gz", entries, PAX_BOMB)
    original = bomb.read_bytes()
    assert len(original) < 200_000

    plain_code, plain_out, plain_peak = process_measured(plain)
    bomb_code, bomb_out, bomb_peak = process_measured(bomb)

    store = deployment.store()
    assert plain_code == 0, plain_out
    assert store.get_by_path(str(plain)).status is S.COMPLETED
    assert list_keys(deployment, f"{deployment.prefix}/pax-bomb/plain.tar.gz/")  # it did the real work
    assert bomb_code == 1, bomb_out
    record = store.get_by_path(str(bomb))
    assert record.status is S.FAILED
    assert "PAX extended header" in record.error_details and "max_header_bytes" in record.error_details
    assert not bomb.exists() and (deployment.errors / "pax-bomb" / "bomb.tar.gz").read_bytes() == original
    assert list_keys(deployment, f"{deployment.prefix}/pax-bomb/bomb.tar.gz") == []
    # The same command, settings and entries, one after the other, differing only in the
    # header; the plain archive is also converted and uploaded, so its run is an upper
    # bound on honest work. Reading the 64 MiB header took the bomb's run to 429 MB, 151 MB
    # over the plain one's 278; refused before reading, it peaks 58 MB under it.
    assert bomb_peak < plain_peak + 64 * 10**6, (bomb_peak, plain_peak)


def test_a_zip_listing_300000_entries_fails_before_its_directory_is_read_and_costs_no_more_memory(
    deployment: Deployment,
) -> None:
    plain = write_zip(deployment.watch / "zip-directory" / "plain.zip", {"promo.csv": csv_bytes(promo_rows(2000))})
    listed = deployment.watch / "zip-directory" / "listed.zip"
    with zipfile.ZipFile(listed, "w") as zf:  # 27 MB: its central directory is all of it
        for i in range(300_000):
            zf.writestr(f"{i:07d}", b"")
    original = listed.read_bytes()

    plain_code, plain_out, plain_peak = process_measured(plain)
    listed_code, listed_out, listed_peak = process_measured(listed)

    store = deployment.store()
    assert plain_code == 0, plain_out
    assert listed_code == 1, listed_out
    record = store.get_by_path(str(listed))
    assert record.status is S.FAILED and "more than 10000 entries (max_entries)" in record.error_details
    assert (deployment.errors / "zip-directory" / "listed.zip").read_bytes() == original
    assert list_keys(deployment, f"{deployment.prefix}/zip-directory/listed.zip") == []
    # zipfile builds an object per listed entry before the first is counted: these 27 MB
    # took the run to 435 MB, 120 MB over the plain archive's 315; counted first, under it.
    assert listed_peak < plain_peak + 64 * 10**6, (listed_peak, plain_peak)


def test_header_only_csv_completes_as_an_empty_dataset(deployment: Deployment) -> None:
    path = deployment.watch / "header-only" / "h.csv"
    path.parent.mkdir()
    path.write_text("userId,promoCode\n")
    (request,) = run_requests_under(sensor_tick(deployment), "header-only")
    assert execute(request, deployment).success
    record = deployment.store().get_by_path(str(path))
    assert record.status is S.COMPLETED and record.total_chunks == 0
    client = deployment.s3.client()
    manifest = client.get_object(
        Bucket=deployment.s3.bucket, Key=f"{deployment.prefix}/header-only/h.csv/_manifest.json"
    )
    assert json.loads(manifest["Body"].read())["totalRows"] == 0


def test_sql_looking_file_name_converts_correctly(deployment: Deployment, tmp_path: Path) -> None:
    path = deployment.watch / "names" / "a'b; DROP TABLE x.csv"
    path.parent.mkdir()
    path.write_text("id,v\n1,a\n2,b\n")
    (request,) = run_requests_under(sensor_tick(deployment), "names")
    assert execute(request, deployment).success
    assert read_dataset(deployment, f"{deployment.prefix}/names/a'b; DROP TABLE x.csv", tmp_path) == [
        (1, "a"),
        (2, "b"),
    ]


def test_nothing_is_written_outside_the_bucket_prefix(deployment: Deployment) -> None:
    client = deployment.s3.client()
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=deployment.s3.bucket)
        for o in page.get("Contents", [])
    ]
    # the deployment's prefix, a transfer test's own t-<hex> prefix, or sources tests put in "incoming/",
    # or the destination of a landing zone a test in this process declared
    zones = tuple(f"{z.destination}/" for z in declared() if z.destination)
    outside = [k for k in keys if not k.startswith((f"{deployment.prefix}/", "t-", "incoming/", *zones))]
    assert outside == []


def test_manual_retry_brings_a_fixed_file_back_and_it_completes(deployment: Deployment) -> None:
    import os
    import subprocess
    import sys

    path = deployment.watch / "retry" / "fixme.csv"
    path.parent.mkdir()
    path.write_text("a,b\n1,2\n3,4,5\n")
    (request,) = run_requests_under(sensor_tick(deployment), "retry")
    assert not execute(request, deployment).success
    parked = deployment.errors / "retry" / "fixme.csv"
    parked.write_text("a,b\n1,2\n3,4\n")  # the user fixes it where it was parked
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "retry", str(parked)],
        cwd=root,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert path.exists() and not parked.exists() and not parked.with_name("fixme.csv.error.json").exists()
    assert deployment.store().get_by_path(str(path)).status is S.PENDING
    (again,) = run_requests_under(sensor_tick(deployment), "retry")
    assert "retry-" in again.run_key  # a new key: run keys are permanent in Dagster
    assert execute(again, deployment).success
    assert deployment.store().get_by_path(str(path)).status is S.COMPLETED


def test_backfill_selects_files_by_glob_and_status(deployment: Deployment) -> None:
    import os
    import subprocess
    import sys

    for name in ("a.csv", "b.csv", "deep/c.csv", "d.tsv"):
        target = deployment.watch / "bf" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("x\n1\n")
    root = Path(__file__).resolve().parents[1]

    def backfill(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "s3proc_dagster.cli", "backfill", "--dry-run", *args],
            cwd=root,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return sorted(line.split("/bf/", 1)[1] for line in out.stdout.splitlines() if "/bf/" in line)

    assert backfill("--glob", "bf/*.csv") == ["a.csv", "b.csv"]
    assert backfill("--glob", "bf/**/*.csv") == ["a.csv", "b.csv", "deep/c.csv"]
    assert backfill("--glob", "bf/**", "--status", "failed") == []
