"""The staging area keeps what a retry needs and nothing else."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from s3proc_dagster.files import staging as staging_area
from s3proc_dagster.files.checksum import sha256_file
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.transfer.manifest import part_key
from s3proc_dagster_tests.conftest import Deployment
from s3proc_dagster_tests.pipeline_helpers import (
    csv_bytes,
    execute,
    process_file_job_with_resources,
    promo_rows,
    reconcile,
    run_requests_under,
    sensor_tick,
    write_csv,
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
