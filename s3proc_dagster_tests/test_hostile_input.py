"""Input that attacks the product itself: whoever drops a file is untrusted.

Each test drops what a hostile producer could drop (a sidecar naming another file, a
link, a key with a newline, a file inside another's dataset, a sparse file of 10 GB) into
the real deployment (SeaweedFS behind the product) and checks that the product touches
nothing outside its zone, writes nothing where it must not, and records the file itself
FAILED with a reason a user can act on.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import dagster as dg
import pytest

from benchmarks.support import Deployment, csv_bytes, list_keys, promo_rows, wait_for, write_csv
from s3proc_dagster.defs.files import sensors
from s3proc_dagster.defs.files.events import asset_key_for
from s3proc_dagster.errors import UnsafeSourceError
from s3proc_dagster.files import parking
from s3proc_dagster.models import ProcessingStatus as S
from s3proc_dagster.models import make_file_id
from s3proc_dagster.pipeline import after_success
from s3proc_dagster.pipeline.failure import give_up
from s3proc_dagster.runs.batching import batch_request
from s3proc_dagster.sources.resolve import locate
from s3proc_dagster.stores.mongo import MongoProgressStore
from s3proc_dagster_tests.pipeline_helpers import (
    execute,
    read_dataset,
    run_requests_under,
    sensor_tick,
    source_rows,
    start_process,
)
from s3proc_dagster_tests.test_batching import batch_run
from s3proc_dagster_tests.test_operations import watch_sensor_cursor
from s3proc_dagster_tests.test_s3_incoming import incoming_tick, put, under

BINARY = b"\x00\x01\x02 this is not a CSV \xff"


def folder() -> str:
    return f"hostile-{uuid.uuid4().hex[:8]}"


def process(*paths: str) -> tuple[int, str]:
    """`s3proc process PATHS` as a user runs it; (exit status, what it printed)."""
    proc = start_process(*paths)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def objects_under(deployment: Deployment, rel_folder: str) -> list[str]:
    return list_keys(deployment, f"{deployment.prefix}/{rel_folder}/")


# ---- a file's metadata never rewrites its identity ---------------------------------------------


def test_a_sidecar_naming_another_file_cannot_make_the_failure_hook_move_it(deployment: Deployment) -> None:
    victim = deployment.root / f"victim-{uuid.uuid4().hex[:6]}.yaml"
    victim.write_text("service: do-not-move\n")
    name = folder()
    bad = deployment.watch / name / "bad.csv"
    bad.parent.mkdir()
    bad.write_bytes(BINARY)
    forged = {"file_id": "pwn-1", "source": str(victim), "path": "elsewhere.csv", "priority": "high"}
    (bad.parent / "bad.csv.meta.json").write_text(json.dumps(forged))

    (request,) = run_requests_under(sensor_tick(deployment), name)
    assert request.tags["s3proc/source"] == str(bad)
    assert request.tags["s3proc/file_id"] == make_file_id(f"{name}/bad.csv")
    assert request.tags["s3proc.meta/source"] == str(victim)  # the metadata is kept, as data
    assert not execute(request, deployment).success

    assert victim.read_text() == "service: do-not-move\n"  # untouched, where it was
    store = deployment.store()
    assert store.get("pwn-1") is None and store.get_by_path(str(victim)) is None
    record = store.get_by_path(str(bad))
    assert record.status is S.FAILED and "binary" in record.error_details
    assert (deployment.errors / name / "bad.csv").read_bytes() == BINARY  # the real file is parked
    run = deployment.instance().get_run_by_id(record.run_id)
    assert run.tags["s3proc/file_id"] == record.file_id and run.tags["s3proc/path"] == f"{name}/bad.csv"


def test_object_metadata_naming_another_file_cannot_make_the_failure_hook_move_it(deployment: Deployment) -> None:
    victim = deployment.root / f"victim-{uuid.uuid4().hex[:6]}.env"
    victim.write_text("S3_SECRET_ACCESS_KEY=not-yours\n")
    name = folder()
    key = f"incoming/{name}/bad.csv"
    put(deployment, key, BINARY, {"file_id": "pwn-2", "source": str(victim)})
    (request,) = under(incoming_tick(deployment, None)[0], name)
    assert request.tags["s3proc/source"] == f"s3://{deployment.s3.bucket}/{key}"
    assert not execute(request, deployment).success

    assert victim.read_text() == "S3_SECRET_ACCESS_KEY=not-yours\n"
    store = deployment.store()
    assert store.get("pwn-2") is None and store.get_by_path(str(victim)) is None
    record = store.get_by_path(f"s3://{deployment.s3.bucket}/{key}")
    assert record.status is S.FAILED and "binary" in record.error_details


# ---- the product's own key space is reserved ----------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    ["_s3proc/step-outputs/{run}/parquet_conversion/result.json", "images/req-{run}/1/1.jpg"],
    ids=["step-outputs", "image-outputs"],
)
def test_no_watched_file_lands_in_the_products_reserved_folders(deployment: Deployment, rel: str) -> None:
    rel = rel.format(run=uuid.uuid4().hex)
    planted = deployment.watch / rel
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b'{"sha256": "forged", "snapshot_path": "/etc/shadow"}')
    code, printed = process(str(planted))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(planted))
    assert record.status is S.FAILED and "reserved for the product's own objects" in record.error_details
    assert list_keys(deployment, f"{deployment.prefix}/{rel}") == []  # nothing landed there


# ---- links are never followed -------------------------------------------------------------------


@pytest.mark.parametrize("target", ["secret", "/proc/self/environ"])
def test_a_link_in_the_watched_directory_is_refused_and_its_target_never_reaches_s3(
    deployment: Deployment, target: str
) -> None:
    secret = deployment.root / f"landing-secret-{uuid.uuid4().hex[:6]}.env"
    secret.write_text("S3_SECRET_ACCESS_KEY=topsecret-value\n")
    name = folder()
    link = deployment.watch / name / "link.txt"
    link.parent.mkdir()
    link.symlink_to(secret if target == "secret" else target)
    code, printed = process(str(link))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(link))
    assert record.status is S.FAILED and "symbolic link" in record.error_details
    assert objects_under(deployment, name) == []
    assert link.is_symlink() and secret.read_text() == "S3_SECRET_ACCESS_KEY=topsecret-value\n"


def test_a_file_swapped_for_a_link_after_the_tick_is_refused(deployment: Deployment) -> None:
    secret = deployment.root / f"swap-secret-{uuid.uuid4().hex[:6]}.csv"
    secret.write_bytes(csv_bytes(promo_rows(5)))
    name = folder()
    src = write_csv(deployment.watch / name / "data.csv", promo_rows(5, seed=3))
    (request,) = run_requests_under(sensor_tick(deployment), name)
    src.unlink()
    src.symlink_to(secret)  # between the tick and the run
    assert not execute(request, deployment).success
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.FAILED and "symbolic link" in record.error_details
    assert objects_under(deployment, name) == []


def test_a_folder_linked_out_of_the_watched_directory_is_not_followed(deployment: Deployment) -> None:
    outside = deployment.root / f"outside-{uuid.uuid4().hex[:6]}"
    write_csv(outside / "a.csv", promo_rows(4))
    name = folder()
    (deployment.watch / name).mkdir()
    (deployment.watch / name / "linked").symlink_to(outside, target_is_directory=True)
    through = deployment.watch / name / "linked" / "a.csv"
    code, printed = process(str(through))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(through))
    assert record.status is S.FAILED and "symbolic link" in record.error_details
    assert (outside / "a.csv").exists()  # not parked through the link either
    assert objects_under(deployment, name) == []


def test_a_hard_link_to_a_file_outside_the_watched_directory_is_refused(deployment: Deployment) -> None:
    outside = deployment.root / f"hard-secret-{uuid.uuid4().hex[:6]}.csv"
    write_csv(outside, promo_rows(4))
    name = folder()
    linked = deployment.watch / name / "data.csv"
    linked.parent.mkdir()
    os.link(outside, linked)  # the same file under a second name, inside the watched directory
    code, printed = process(str(linked))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(linked))
    assert record.status is S.FAILED and "hard links" in record.error_details
    assert objects_under(deployment, name) == []
    assert outside.read_bytes() == csv_bytes(promo_rows(4))  # the other name untouched


def test_a_sidecar_linked_to_a_credentials_file_becomes_no_tag_and_fails_its_file(deployment: Deployment) -> None:
    config = deployment.root / f"docker-config-{uuid.uuid4().hex[:6]}.json"
    config.write_text(json.dumps({"auths": {"registry": {"auth": "c2VjcmV0LXRva2Vu"}}}))
    name = folder()
    src = write_csv(deployment.watch / name / "data.csv", promo_rows(5))
    (src.parent / "data.csv.meta.json").symlink_to(config)
    (request,) = run_requests_under(sensor_tick(deployment), name)
    assert not any("c2VjcmV0" in value or "auths" in key for key, value in request.tags.items())
    assert not execute(request, deployment).success
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.FAILED and "metadata sidecar" in record.error_details
    assert "symbolic link" in record.error_details
    run = deployment.instance().get_run_by_id(record.run_id)
    assert not any("c2VjcmV0" in value for value in run.tags.values())


def _swap_for_link(folder: Path, to: Path) -> None:
    """What a producer racing the service does: the folder it saw becomes a link to elsewhere."""
    folder.rename(folder.with_name(folder.name + ".real"))
    folder.symlink_to(to, target_is_directory=True)


def test_a_product_csv_behind_a_folder_swapped_for_a_link_is_refused_and_never_published(
    deployment: Deployment,
) -> None:
    outside = deployment.root / f"other-team-{uuid.uuid4().hex[:6]}"
    outside.mkdir()
    theirs = "S. No.,Product Name,Input Image Urls\n1,Unreleased product,http://127.0.0.1:9/a.jpg\n"
    (outside / "products.csv").write_text(theirs)
    name = folder()
    drop = deployment.watch / name / "drop"
    drop.mkdir(parents=True)
    (drop / "products.csv").write_text("S. No.,Product Name,Input Image Urls\n1,Decoy,http://127.0.0.1:9/b.jpg\n")
    (request,) = run_requests_under(sensor_tick(deployment), name)
    assert request.job_name == "image_request_job"  # routed by its header while the folder was real
    _swap_for_link(drop, outside)  # between the tick and the run

    from s3proc_dagster.runs.reconstructable import image_request_job_with_resources

    result = dg.execute_job(
        dg.reconstructable(image_request_job_with_resources),
        instance=deployment.instance(),
        run_config=request.run_config,
        tags=request.tags,
    )
    assert not result.success
    request_id = deployment.instance().get_run_by_id(result.run_id).tags["s3proc/request_id"]
    store = deployment.store()
    refused = store.require_request(request_id)
    assert refused.status.value == "failed" and "symbolic link" in refused.errors[0], refused.errors
    assert store.list_request_rows(request_id) == []  # nothing of the other team's CSV was read
    assert list_keys(deployment, f"{deployment.prefix}/images/{request_id}/") == []
    assert (outside / "products.csv").read_text() == theirs


# ---- moving or deleting a file never follows a folder swapped for a link meanwhile ---------------


def _victims(deployment: Deployment, name: str, content: str) -> Path:
    """A folder outside the watched directory holding a file named as the producer's."""
    victims = deployment.root / f"victims-{uuid.uuid4().hex[:6]}"
    victims.mkdir()
    (victims / name).write_text(content)
    return victims


def _swap_after_the_last_check(monkeypatch: pytest.MonkeyPatch, root: Path, folder: Path, to: Path) -> None:
    """Parking's confinement check passes below `root`, and then the producer swaps `folder`
    for a link to `to`: the race the move must lose safely, at its worst moment."""
    checked = parking.confined_path

    def check_then_swap(path: Path, where: Path) -> Path | None:
        found = checked(path, where)
        if Path(where) == root:
            _swap_for_link(folder, to)
        return found

    monkeypatch.setattr(parking, "confined_path", check_then_swap)


def test_parking_never_follows_a_folder_swapped_for_a_link_while_the_file_moves(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    victims = _victims(deployment, "bad.csv", "service: do-not-move\n")
    name = folder()
    bad = deployment.watch / name / "d" / "bad.csv"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(BINARY)
    _swap_after_the_last_check(monkeypatch, deployment.errors, bad.parent, victims)  # before the move
    store = deployment.store()
    file_id = make_file_id(f"{name}/d/bad.csv")
    gave_up = give_up(
        store,
        deployment.s3.client(),
        f"race-{uuid.uuid4().hex}",
        file_id,
        str(bad),
        "binary",
        deployment.watch,
        deployment.errors,
    )
    assert gave_up.parked is None and "symbolic link" in (gave_up.park_error or "")
    assert (victims / "bad.csv").read_text() == "service: do-not-move\n"  # not moved through the link
    assert not (deployment.errors / name / "d" / "bad.csv").exists()
    assert (deployment.watch / name / "d.real" / "bad.csv").read_bytes() == BINARY
    record = store.get(file_id)
    assert record.status is S.FAILED and "symbolic link" in record.error_details


def test_a_retry_never_moves_the_parked_file_through_a_folder_swapped_for_a_link(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    victims = _victims(deployment, "keep.txt", "someone else's\n")
    name = folder()
    parked = deployment.errors / name / "d" / "authorized_keys"
    parked.parent.mkdir(parents=True)
    parked.write_text("ssh-ed25519 AAAA-the-producers-key\n")
    home = deployment.watch / name / "d" / "authorized_keys"
    home.parent.mkdir(parents=True)
    _swap_after_the_last_check(monkeypatch, deployment.watch, home.parent, victims)  # before the move back
    with pytest.raises(UnsafeSourceError, match="symbolic link"):
        parking.unpark(home, deployment.watch, deployment.errors)
    assert sorted(p.name for p in victims.iterdir()) == ["keep.txt"]  # nothing landed through the link
    assert parked.read_text() == "ssh-ed25519 AAAA-the-producers-key\n"  # it stays parked


def test_after_success_delete_never_follows_a_folder_swapped_for_a_link(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = folder()
    src = write_csv(deployment.watch / name / "d" / "daily.csv", promo_rows(4))
    code, printed = process(str(src))
    assert code == 0, printed
    store = deployment.store()
    record = store.get_by_path(str(src))
    victims = _victims(deployment, "daily.csv", "another team's daily.csv\n")
    store.update_file(record.file_id, after_success="delete (pending)")  # as a zone with after_success: delete
    still = after_success._still

    def check_then_swap(original: Path, rec, root: Path) -> bool:
        same = still(original, rec, root)
        if rec.file_id == record.file_id:  # the version checked: the producer swaps the folder now
            _swap_for_link(src.parent, victims)
        return same

    monkeypatch.setattr(after_success, "_still", check_then_swap)
    after_success.finish_pending(store, deployment.s3.client(), deployment.s3.bucket, (deployment.watch,))
    assert (victims / "daily.csv").read_text() == "another team's daily.csv\n"  # not deleted through the link
    assert (deployment.watch / name / "d.real" / "daily.csv").exists()
    outcome = store.get(record.file_id).after_success
    assert outcome.startswith("not deleted") and "symbolic link" in outcome, outcome


# ---- one bad sidecar fails its file alone --------------------------------------------------------


def bad_sidecars(root: Path) -> dict[str, str]:
    """Files with sidecars that broke every tick, and the reason each must end with."""
    deep = root / "deep.csv"
    write_csv(deep, promo_rows(3))
    (root / "deep.csv.meta.json").write_text("[" * 20_000 + "]" * 20_000)  # 40 KB: nested too deeply
    huge = root / "huge.csv"
    write_csv(huge, promo_rows(3))
    (root / "huge.csv.meta.json").write_text("[" * 100_000 + "]" * 100_000)
    fifo = root / "fifo.csv"
    write_csv(fifo, promo_rows(3))
    os.mkfifo(root / "fifo.csv.meta.json")  # unreadable as a file: opening it would block
    long_key = root / "longkey.csv"
    write_csv(long_key, promo_rows(3))
    (root / "longkey.csv.meta.json").write_text(json.dumps({"k" * 307: "v"}))
    nested = root / "nested.csv"  # parses, but 900 lists deep broke the record and the step's output
    write_csv(nested, promo_rows(3))
    (root / "nested.csv.meta.json").write_text('{"a": ' + "[" * 900 + "]" * 900 + "}")
    surrogate = root / "surrogate.csv"  # a lone surrogate: no run tag or record can hold it
    write_csv(surrogate, promo_rows(3))
    (root / "surrogate.csv.meta.json").write_text('{"a": "\\ud800"}')
    claims = root / "claims.csv"  # the key that ties an archive's entries to it: the product's own
    write_csv(claims, promo_rows(3))
    (root / "claims.csv.meta.json").write_text(json.dumps({"ArchiveFileId": make_file_id("other.zip")}))
    return {
        str(deep): "nested too deeply",
        str(huge): "over 65,536 bytes",
        str(fifo): "not a regular file",
        str(long_key): "longer than 64 characters",
        str(nested): "nested more than 8 levels deep",
        str(surrogate): "not valid UTF-8",
        str(claims): "is the product's own",
    }


def test_bad_sidecars_fail_their_files_while_the_sensor_runs_the_others(
    deployment: Deployment, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("dagster_dev")  # its daemon ticks the real sensor and runs the queue
    instance = deployment.instance()
    wait_for(lambda: watch_sensor_cursor(instance), "the watch sensor's first tick", timeout=180)
    root = deployment.watch / folder()
    root.mkdir()
    expected = bad_sidecars(root)
    unnamed = os.fsencode(root) + b"/bad\xff\xfe.csv"  # not UTF-8: no run can carry the name
    with open(unnamed, "wb") as raw:
        raw.write(csv_bytes(promo_rows(3)))
    good = write_csv(root / "good.csv", promo_rows(25))
    store = deployment.store()

    def settled() -> bool:
        records = [store.get_by_path(p) for p in [*expected, str(good)]]
        return all(r is not None and r.status in (S.COMPLETED, S.FAILED) for r in records)

    wait_for(settled, "every file's run", timeout=300)
    assert store.get_by_path(str(good)).status is S.COMPLETED
    for path, reason in expected.items():
        record = store.get_by_path(path)
        assert record.status is S.FAILED and reason in record.error_details, (path, record.error_details)
    assert os.path.exists(unnamed)  # left where it is, said in the sensor's log, never a stopped tick


@pytest.mark.parametrize(
    "sidecar, reason",
    [
        ('{"orderId": 123456789012345678901234567890}', "an integer beyond 64 bits"),
        ('{"a\\u0000b": "x"}', "a key with a NUL character"),
        ('{"score": NaN}', "NaN or Infinity"),
    ],
    ids=["big-int", "nul-key", "nan"],
)
def test_metadata_the_progress_store_cannot_keep_fails_its_file_with_the_reason(
    deployment: Deployment,
    mongodb_uri: str,
    mongodb_database: str,
    monkeypatch: pytest.MonkeyPatch,
    sidecar: str,
    reason: str,
) -> None:
    monkeypatch.setenv("MONGODB_URI", mongodb_uri)  # read when the run starts: this run's store is MongoDB
    monkeypatch.setenv("MONGODB_DATABASE", mongodb_database)
    name = folder()
    src = write_csv(deployment.watch / name / "data.csv", promo_rows(3))
    (src.parent / "data.csv.meta.json").write_text(sidecar)
    code, printed = process(str(src))
    assert code == 1, printed
    store = MongoProgressStore(mongodb_uri, mongodb_database)
    record = store.get_by_path(str(src))
    assert record.status is S.FAILED and "data.csv.meta.json" in record.error_details
    assert reason in record.error_details, record.error_details  # was "MongoDB can only handle up to 8-byte ints"


def test_an_object_the_service_cannot_read_fails_alone_and_the_s3_sensor_goes_on(deployment: Deployment) -> None:
    name = folder()
    deployment.s3.client().put_object(  # readable only with a key the service does not have
        Bucket=deployment.s3.bucket,
        Key=f"incoming/{name}/sealed.csv",
        Body=csv_bytes(promo_rows(3)),
        SSECustomerAlgorithm="AES256",
        SSECustomerKey=os.urandom(32),
    )
    put(deployment, f"incoming/{name}/good.csv", csv_bytes(promo_rows(4)))
    requests = {r.tags["s3proc/path"]: r for r in under(incoming_tick(deployment, None)[0], name)}
    assert sorted(requests) == [f"{name}/good.csv", f"{name}/sealed.csv"]  # the tick went on
    assert execute(requests[f"{name}/good.csv"], deployment).success
    assert not execute(requests[f"{name}/sealed.csv"], deployment).success
    record = deployment.store().get_by_path(f"s3://{deployment.s3.bucket}/incoming/{name}/sealed.csv")
    assert record.status is S.FAILED and record.error_details


def test_an_object_deleted_before_its_run_fails_with_the_reason_and_the_batch_goes_on(
    deployment: Deployment,
) -> None:
    name = folder()
    put(deployment, f"incoming/{name}/gone.csv", csv_bytes(promo_rows(3)))
    put(deployment, f"incoming/{name}/good.csv", csv_bytes(promo_rows(4)))
    requests = sorted(under(incoming_tick(deployment, None)[0], name), key=lambda r: r.tags["s3proc/path"])
    deployment.s3.client().delete_object(Bucket=deployment.s3.bucket, Key=f"incoming/{name}/gone.csv")
    assert batch_run(deployment, batch_request(requests)).success  # the batch goes on for the other

    store = deployment.store()
    assert store.get_by_path(f"s3://{deployment.s3.bucket}/incoming/{name}/good.csv").status is S.COMPLETED
    gone = store.get_by_path(f"s3://{deployment.s3.bucket}/incoming/{name}/gone.csv")
    # at once, not after every retry as "An error occurred (404) when calling the HeadObject operation"
    assert gone.status is S.FAILED and "no such object: it was deleted or renamed" in gone.error_details


def test_an_object_that_keeps_failing_in_a_batch_gets_a_run_of_its_own_and_ends_failed(
    deployment: Deployment,
) -> None:
    name = folder()
    uri = f"s3://{deployment.s3.bucket}/incoming/{name}/lying.csv"
    put(deployment, f"incoming/{name}/lying.csv", csv_bytes(promo_rows(3)), {"x-sha256": "0" * 64})
    put(deployment, f"incoming/{name}/good.csv", csv_bytes(promo_rows(4)))
    requests, cursor = incoming_tick(deployment, None)
    assert batch_run(deployment, batch_request(under(requests, name))).success
    store = deployment.store()
    left = store.get_by_path(uri)  # failed before it was read: its record has no source object's fields
    assert left.status is S.PENDING and "left batch run" in left.error_details and left.source_key is None

    # it stayed PENDING for good: the sensor requeued only records with those fields
    (own,) = under(incoming_tick(deployment, cursor)[0], name)
    assert own.job_name == "process_file_job" and own.tags["s3proc/path"] == f"{name}/lying.csv"
    assert not execute(own, deployment).success
    failed = store.get_by_path(uri)
    assert failed.status is S.FAILED and "its x-amz-meta-x-sha256 says " + "0" * 64 in failed.error_details


def test_a_flood_of_objects_is_requested_once_each_across_ticks_that_run_out_of_time(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = folder()
    keys = [f"incoming/{name}/f{i:02d}.csv" for i in range(12)]
    for key in keys:
        put(deployment, key, b"a\n1\n")
    # every tick out of time after its first object: 5,000 objects took a loaded machine past
    # Dagster's 60-s call, the tick failed and kept its cursor, and no object had a run for minutes
    monkeypatch.setattr(sensors, "INCOMING_TICK_S", 0.0)
    listed = len(list_keys(deployment, "incoming/"))  # other tests' objects too: one a tick
    seen: list[dg.RunRequest] = []
    cursor, ticks = None, 0
    while ticks <= listed and len(seen) < len(keys):
        requests, cursor = incoming_tick(deployment, cursor)
        seen += under(requests, name)
        ticks += 1
    assert sorted(r.tags["s3proc/path"] for r in seen) == sorted(k.removeprefix("incoming/") for k in keys)
    monkeypatch.undo()

    # batched, they are not requested again when the next pass lists them again
    assert batch_run(deployment, batch_request(seen)).success
    assert under(incoming_tick(deployment, None)[0], name) == []  # a pass from the start: all listed again
    store = deployment.store()
    assert {store.get_by_path(f"s3://{deployment.s3.bucket}/{k}").status for k in keys} == {S.COMPLETED}


# ---- names are canonical, and no file lands inside another's dataset -----------------------------


def test_a_newline_in_an_incoming_key_fails_the_object_and_adds_no_manifest_line(deployment: Deployment) -> None:
    name = folder()
    key = f"incoming/{name}/ok\ns3:/victim-bucket/secret.parquet\n.csv"
    put(deployment, key, csv_bytes(promo_rows(5)))
    (request,) = under(incoming_tick(deployment, None)[0], name)
    assert not execute(request, deployment).success
    record = deployment.store().get_by_path(f"s3://{deployment.s3.bucket}/{key}")
    assert record.status is S.FAILED and "control character" in record.error_details
    assert objects_under(deployment, name) == []  # no dataset, so no symlink manifest with a forged line


@pytest.mark.parametrize("rel", ["a/../b.csv", "/lead.csv", "a//b.csv", "./c.csv"])
def test_a_uri_that_is_not_one_canonical_key_is_refused_with_its_reason(deployment: Deployment, rel: str) -> None:
    name = folder()
    put(deployment, f"incoming/{name}/b.csv", csv_bytes(promo_rows(5)))  # what S3 would normalise it to
    uri = f"s3://{deployment.s3.bucket}/incoming/{name}/{rel}"
    code, printed = process(uri)
    assert code == 1, printed
    record = deployment.store().get_by_path(uri)
    assert record.status is S.FAILED and f"{name}/{rel}" in record.error_details
    assert objects_under(deployment, name) == []
    with pytest.raises(UnsafeSourceError):
        locate(uri, deployment.watch, "incoming")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("images\\planted.csv", "backslash"),  # SeaweedFS stores it as images/planted.csv
        ("landed.csv\\v-0000000000000000\\part-00000.parquet", "backslash"),
        ("nel\x85.csv", "control character"),
        ("line\u2028sep.csv", "control character"),
        ("spoof\u202egnp.csv", "control character"),
        ("zero\u200bwidth.csv", "invisible"),
        ("arabic\u061cmark.csv", "invisible"),
    ],
    ids=[
        "backslash-reserved",
        "backslash-dataset",
        "c1-control",
        "line-separator",
        "direction-override",
        "zero-width-space",
        "arabic-letter-mark",
    ],
)
def test_a_name_s3_or_a_terminal_would_read_as_another_is_refused(
    deployment: Deployment, name: str, reason: str
) -> None:
    rel = folder()
    planted = deployment.watch / rel / name
    planted.parent.mkdir()
    planted.write_bytes(csv_bytes(promo_rows(3)))
    code, printed = process(str(planted))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(planted))
    assert record.status is S.FAILED and reason in record.error_details
    assert objects_under(deployment, rel) == []
    assert not [k for k in list_keys(deployment, f"{deployment.prefix}/images/") if "planted" in k]
    assert planted.exists() or (deployment.errors / rel / name).exists()  # the original kept


def test_a_file_inside_another_files_dataset_is_refused_and_both_stay_intact(
    deployment: Deployment, tmp_path: Path
) -> None:
    name = folder()
    outer = csv_bytes(promo_rows(40, seed=4))
    put(deployment, f"incoming/{name}/x.csv", outer)
    put(deployment, f"incoming/{name}/x.csv/y.csv", csv_bytes(promo_rows(10, seed=5)))
    requests = {r.tags["s3proc/path"]: r for r in under(incoming_tick(deployment, None)[0], name)}
    assert sorted(requests) == [f"{name}/x.csv", f"{name}/x.csv/y.csv"]
    assert not execute(requests[f"{name}/x.csv/y.csv"], deployment).success
    assert execute(requests[f"{name}/x.csv"], deployment).success
    store = deployment.store()
    inner = store.get_by_path(f"s3://{deployment.s3.bucket}/incoming/{name}/x.csv/y.csv")
    assert inner.status is S.FAILED and "would land inside the S3 folder of" in inner.error_details
    (tmp_path / "x.csv").write_bytes(outer)
    assert read_dataset(deployment, f"{deployment.prefix}/{name}/x.csv", tmp_path) == source_rows(
        tmp_path / "x.csv", "read_csv"
    )
    assert not [k for k in objects_under(deployment, name) if "/y.csv" in k]
    # the source objects themselves are the producer's and stay as they were
    assert list_keys(deployment, f"incoming/{name}/") == [f"incoming/{name}/x.csv", f"incoming/{name}/x.csv/y.csv"]


def test_a_name_with_no_room_left_for_a_sidecar_is_processed(deployment: Deployment) -> None:
    name = folder()
    src = write_csv(deployment.watch / name / ("n" * 246 + ".csv"), promo_rows(3))  # `.meta.json` would be 260 bytes
    code, printed = process(str(src))
    assert code == 0, printed  # its sidecar cannot exist, so it has none; it failed as "cannot be read"
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.COMPLETED and record.metadata == {}


def test_a_path_too_long_for_an_s3_key_is_refused_before_any_upload(deployment: Deployment) -> None:
    name = folder()
    deep = deployment.watch / name / "/".join("d" * 200 for _ in range(5)) / "data.csv"  # over 1,000 bytes
    write_csv(deep, promo_rows(3))
    code, printed = process(str(deep))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(deep))
    assert record.status is S.FAILED and "too long for an S3 key" in record.error_details, record.error_details
    assert objects_under(deployment, name) == []  # it failed at once, not at the upload after its retries


def test_file_ids_and_asset_keys_keep_every_spelling_apart() -> None:
    assert make_file_id("a//b.csv") != make_file_id("a/b.csv") != make_file_id("a_b.csv")
    assert asset_key_for("deploy", "promo.csv") != asset_key_for("deploy", "promo_csv")
    assert asset_key_for("deploy", "nyc/flights.csv") == dg.AssetKey(["deploy", "nyc", "flights.csv"])


# ---- sizes are bounded ---------------------------------------------------------------------------


def test_a_sparse_file_of_ten_gigabytes_is_refused_unread(deployment: Deployment) -> None:
    name = folder()
    sparse = deployment.watch / name / "huge.bin"
    sparse.parent.mkdir()
    with sparse.open("wb") as f:
        f.truncate(10 * 2**30)  # 10 GB that cost nothing on disk
    code, printed = process(str(sparse))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(sparse))
    assert record.status is S.FAILED and "sparse file" in record.error_details
    staged = Path(deployment.env["STAGING_DIRECTORY"])
    assert sum(p.stat().st_size for p in staged.rglob("*") if p.is_file()) < 2**30
    assert objects_under(deployment, name) == []


def test_a_file_over_max_file_bytes_is_refused(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    name = folder()
    src = write_csv(deployment.watch / name / "big.csv", promo_rows(200))
    monkeypatch.setenv("MAX_FILE_BYTES", "1000")
    code, printed = process(str(src))
    assert code == 1, printed
    record = deployment.store().get_by_path(str(src))
    assert record.status is S.FAILED and "over MAX_FILE_BYTES (1,000)" in record.error_details


def test_metadata_tags_are_bounded_and_apart_from_the_products_tags(deployment: Deployment) -> None:
    name = folder()
    src = write_csv(deployment.watch / name / "tagged.csv", promo_rows(3))
    (src.parent / "tagged.csv.meta.json").write_text(json.dumps({"campaignId": "c" * 5000, "file_id": "x"}))
    (request,) = run_requests_under(sensor_tick(deployment), name)
    assert request.tags["s3proc.meta/campaignId"] == "c" * 200
    assert request.tags["s3proc/file_id"] == make_file_id(f"{name}/tagged.csv")
    assert execute(request, deployment).success
