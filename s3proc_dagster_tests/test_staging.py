"""The staging area keeps what a retry needs and nothing else, for the product's user alone."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.support import Deployment, csv_bytes, promo_rows, wait_for, write_csv
from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.runs.launch import code_location, create_run
from s3proc_dagster.runs.reconstructable import process_file_job_with_resources
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.pipeline_helpers import (
    execute,
    reconcile,
    run_requests_under,
    sensor_tick,
    start_process,
    write_zip,
)


def staged(deployment: Deployment, sha: str) -> list[str]:
    root = Path(deployment.env["STAGING_DIRECTORY"])
    return [p.name for p in (root / sha, staging_area.work_dir(root, sha)) if p.exists()]


def test_completed_files_leave_nothing_in_staging(deployment: Deployment) -> None:
    w = deployment.watch / "tidy"
    files = [write_csv(w / f"p{i}.csv", promo_rows(30_000 + i, seed=i)) for i in range(3)]
    (w / "lines.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(50)))
    files.append(w / "lines.jsonl")
    files.append(write_zip(w / "bundle.zip", {"a.csv": csv_bytes(promo_rows(5)), "b/c.csv": csv_bytes(promo_rows(7))}))
    (w / "blob.bin").write_bytes(os.urandom(3000))
    files.append(w / "blob.bin")
    requests = run_requests_under(sensor_tick(deployment), "tidy")
    assert len(requests) == len(files)
    for request in requests:
        assert execute(request, deployment).success
    assert execute(requests[0], deployment).success  # an unchanged file run again: its snapshot goes too
    store = deployment.store()
    for path in files:
        assert store.get_by_path(str(path)).status is S.COMPLETED
        assert staged(deployment, sha256_file(path)) == [], path.name


def test_a_failed_run_reexecutes_after_other_files_staging_was_cleaned(deployment: Deployment) -> None:
    src = write_csv(deployment.watch / "keepfailed" / "promo.csv", promo_rows(120_001, seed=81))
    sha = sha256_file(src)
    dataset = f"{deployment.prefix}/keepfailed/promo.csv"
    (request,) = run_requests_under(sensor_tick(deployment), "keepfailed")
    deployment.proxy.fail_puts_containing = f"/{part_key(dataset, sha, 1)}"
    try:
        failed = execute(request, deployment)
    finally:
        deployment.proxy.fail_puts_containing = None
    assert not failed.success
    assert staged(deployment, sha) == [sha, f"{sha}.work"]  # what a re-execution starts from stays

    other = write_csv(deployment.watch / "keepfailed-others" / "o.csv", promo_rows(2_000, seed=82))
    (request,) = run_requests_under(sensor_tick(deployment), "keepfailed-others")
    assert execute(request, deployment).success
    assert staged(deployment, sha256_file(other)) == []
    assert reconcile(deployment).success  # the sweep keeps what a FAILED file needs
    assert staged(deployment, sha) == [sha, f"{sha}.work"]

    instance = deployment.instance()
    again = dg.execute_job(
        dg.reconstructable(process_file_job_with_resources),
        instance=instance,
        reexecution_options=dg.ReexecutionOptions.from_failure(failed.run_id, instance),
    )
    assert again.success
    assert deployment.store().get_by_path(str(src)).status is S.COMPLETED
    assert staged(deployment, sha) == []


def test_the_sweep_removes_old_entries_no_file_needs(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    keep, stray = "a" * 64, "b" * 64
    for sha in (keep, stray):
        (root / sha).mkdir(parents=True)
        (root / sha / "f.csv").write_text("x")
        staging_area.work_dir(root, sha).mkdir()
    (root / ".snapshot-123.partial").write_text("half a file")
    (root / "images").mkdir()  # not a version: left alone
    assert staging_area.sweep(root, {keep}, older_than_s=3600).entries == 0  # too young to judge
    swept = staging_area.sweep(root, {keep}, older_than_s=0, now=os.path.getmtime(root / stray) + 1)
    assert swept.entries == 3 and swept.bytes > 0
    assert sorted(p.name for p in root.iterdir()) == sorted([keep, f"{keep}.work", "images"])


def group_or_other_access(root: Path, sha: str) -> dict[str, str]:
    """What of a staged version (`<sha>/`, `<sha>.work/` and all below) anyone but its owner may use."""
    tops = [root / sha, staging_area.work_dir(root, sha)]
    entries = [p for top in tops for p in (top, *top.rglob("*"))]
    return {str(p.relative_to(root)): oct(mode(p)) for p in entries if mode(p) & 0o077}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run_in_a_warm_run_worker(deployment: Deployment, request: dg.RunRequest) -> dg.DagsterRunStatus:
    """The run forked by the instance's own launcher (WarmRunLauncher), as the daemon has it done."""
    with deployment.instance() as instance:  # leaving it stops the zygote it started
        with code_location(instance) as location:
            run = create_run(instance, location, request)
        instance.launch_run(run.run_id, workspace=None)  # the warm launcher needs no workspace
        wait_for(lambda: instance.get_run_by_id(run.run_id).is_finished, "the forked run to end", timeout=240)
        return instance.get_run_by_id(run.run_id).status


@pytest.mark.parametrize("worker", ["warm run worker", "s3proc process"])
def test_a_runs_staging_is_readable_by_the_product_user_only(
    worker: str, deployment: Deployment, monkeypatch: pytest.MonkeyPatch, world_readable_umask: None
) -> None:
    """Snapshot, extracted entries and Parquet parts, as the two run workers that set the
    umask leave them; the test's own umask is 022, which would make them 0644."""
    folder = "private-" + worker.replace(" ", "-")
    src = write_zip(
        deployment.watch / folder / "bundle.zip",
        {"a.csv": csv_bytes(promo_rows(50_001, seed=91)), "b/c.csv": csv_bytes(promo_rows(20))},
    )
    monkeypatch.setenv("STAGING_RETENTION", "PT1H")  # COMPLETED keeps its staging, to be looked at
    if worker == "s3proc process":
        proc = start_process(str(src))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
    else:
        (request,) = run_requests_under(sensor_tick(deployment), folder)
        assert run_in_a_warm_run_worker(deployment, request) == dg.DagsterRunStatus.SUCCESS
    assert deployment.store().get_by_path(str(src)).status is S.COMPLETED

    root, sha = Path(deployment.env["STAGING_DIRECTORY"]), sha256_file(src)
    staged_files = [p.name for p in (root / sha).iterdir()]
    staged_files += [p.name for p in staging_area.work_dir(root, sha).rglob("*") if p.is_file()]
    assert "bundle.zip" in staged_files and "a.csv" in staged_files and "c.csv" in staged_files
    assert sum(name.endswith(".parquet") for name in staged_files) >= 3  # a.csv's two chunks, c.csv's one
    assert mode(root) == 0o700
    assert group_or_other_access(root, sha) == {}
