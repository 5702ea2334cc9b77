"""Image requests against a real HTTP server on loopback and SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import ssl
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
from PIL import Image

from benchmarks.support import Deployment, S3Endpoint
from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv, looks_like_request_csv, parse_request_csv
from s3proc_dagster.models import RequestStatus
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.stores.mongo import MongoProgressStore
from s3proc_dagster.stores.sqlite import SQLiteProgressStore
from s3proc_dagster_tests.pipeline_helpers import COMMAND_DIR

ROOT = Path(__file__).resolve().parents[1]
#: This module's fixtures that listen on loopback (conftest.py marks their tests `servers`).
SERVER_FIXTURES = {"images", "webhook"}


def jpeg_rotated() -> bytes:
    """400x200 pixels stored, EXIF orientation 6: shown as 200x400 once rotated."""
    img = Image.new("RGB", (400, 200))
    img.putdata([((x * 7) % 256, (y * 3) % 256, (x + y) % 256) for y in range(200) for x in range(400)])
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def png_alpha() -> bytes:
    img = Image.new("RGBA", (300, 300))
    img.putdata([(x % 256, y % 256, 128, (x * y) % 256) for y in range(300) for x in range(300)])
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=0)
    return out.getvalue()


def webp() -> bytes:
    img = Image.new("RGB", (320, 240))
    img.putdata([((x * 5) % 256, (y * 9) % 256, 40) for y in range(240) for x in range(320)])
    out = io.BytesIO()
    img.save(out, "WEBP", quality=100)
    return out.getvalue()


def png_bomb() -> bytes:
    """A tiny PNG whose header declares 100,000 x 100,000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    )


REDIRECTS = {
    "/loop": "/loop",
    "/to-metadata": "http://169.254.169.254/latest/meta-data/",
    "/to-mixed": "http://mixed.example.test/a.jpg",
    "/to-file": "file:///etc/passwd",
}


DRIP_INTERVAL_S = 0.5  # the dripping paths send one byte this often...
DRIP_BYTES = 120  # ...this many times (a minute), then hang up


class ImageServer:
    """Images and redirects on loopback; `seen` records (path, Host header) per request and
    `sni` the TLS server names clients asked for (with `tls`). `/drip-headers.jpg` and
    `/drip-body.jpg` send a byte every DRIP_INTERVAL_S, in the headers or in the body, so
    that no single read ever times out; `/bad-length.jpg` and `/bad-gzip.jpg` are an image
    with `Content-Length: abc` and a gzip-encoded body that is not gzip."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[tuple[str, str]] = []
        self.sni: list[str | None] = []
        self.files = {
            "/a.jpg": ("image/jpeg", jpeg_rotated()),
            "/b.png": ("image/png", png_alpha()),
            "/c.webp": ("image/webp", webp()),
            "/fake.jpg": ("image/jpeg", b"<html>not an image</html>" * 10),
            "/bomb.png": ("image/png", png_bomb()),
        }
        files, seen = self.files, self.seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Host", "")))
                if self.path == "/slow.jpg":
                    time.sleep(3)  # the server is slow; the client's timeout is what is tested
                if self.path in ("/drip-headers.jpg", "/drip-body.jpg"):
                    self.drip(files["/a.jpg"][1])
                    return
                if self.path in ("/bad-length.jpg", "/bad-gzip.jpg"):
                    body = files["/a.jpg"][1] if self.path == "/bad-length.jpg" else b"this is not gzip" * 8
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    if self.path == "/bad-length.jpg":
                        self.send_header("Content-Length", "abc")
                    else:
                        self.send_header("Content-Encoding", "gzip")
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path in REDIRECTS:
                    self.send_response(302)
                    self.send_header("Location", REDIRECTS[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path not in files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                ctype, body = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def drip(self, image: bytes) -> None:
                head = b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n"
                if self.path == "/drip-body.jpg":
                    head += b"Content-Length: %d\r\n\r\n" % len(image)
                    dripped = image[:DRIP_BYTES]
                else:
                    head += b"X-Drip: "
                    dripped = b"a" * DRIP_BYTES
                try:
                    self.wfile.write(head)
                    for i in range(len(dripped)):
                        time.sleep(DRIP_INTERVAL_S)  # the server's pace, not a wait for a condition
                        self.wfile.write(dripped[i : i + 1])
                except OSError:  # the client hung up: what is tested is that it did
                    pass
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def images() -> ImageServer:
    server = ImageServer()
    yield server
    server.server.shutdown()


def good_csv(base: str) -> bytes:
    return (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,Shirt,"{base}/a.jpg,{base}/b.png"\n'
        f'2,Mug,"{base}/c.webp,{base}/a.jpg,{base}/b.png"\n'
        f'3,Hat,"{base}/b.png,{base}/c.webp"\n'
    ).encode()


def options(s3: S3Endpoint, prefix: str, **kw) -> processor.ImageOptions:
    """Fast-failing options. The image server is on loopback, so private destinations are
    allowed unless a test says otherwise."""
    kw.setdefault("allow_private_urls", True)
    return processor.ImageOptions(
        bucket=s3.bucket, prefix=prefix, fetch_timeout_s=1.0, retries=1, retry_delay_s=0.05, **kw
    )


def run_request(store: ProgressStore, data: bytes, s3: S3Endpoint, opts: processor.ImageOptions, tmp: Path):
    request = processor.submit(store, data, "products.csv")
    store.set_request_status(request.request_id, RequestStatus.PROCESSING)
    for row in store.list_request_rows(request.request_id):
        processor.process_row(store, row, s3.client(), opts, tmp)
    return processor.finalize(store, request.request_id, s3.client(), opts, tmp)


# MongoDB is asked for at run time, out of sight of conftest's fixture rule: the param is marked.
@pytest.fixture(params=["sqlite", pytest.param("mongodb", marks=pytest.mark.servers)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ProgressStore:
    if request.param == "sqlite":
        opened: ProgressStore = SQLiteProgressStore(tmp_path / "p.db")
    else:
        opened = MongoProgressStore(request.getfixturevalue("mongodb_uri"), request.getfixturevalue("mongodb_database"))
    yield opened
    opened.close()


def test_three_rows_compress_in_order_and_complete(
    store: ProgressStore, images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    done = run_request(store, good_csv(images.url), s3, options(s3, s3_prefix), tmp_path)
    assert done.status is RequestStatus.COMPLETED and done.errors == []
    rows = store.list_request_rows(done.request_id)
    assert [r.serial_number for r in rows] == [1, 2, 3]
    client = s3.client()
    for row in rows:
        assert row.completed_at is not None and row.created_at is not None
        assert len(row.output_image_urls) == len(row.input_image_urls)
        for n, (url_in, url_out) in enumerate(zip(row.input_image_urls, row.output_image_urls, strict=True), start=1):
            ext = {"jpg": "jpg", "png": "png", "webp": "webp"}[url_in.rsplit(".", 1)[1]]
            key = f"{s3_prefix}/images/{done.request_id}/{row.serial_number}/{n}.{ext}"
            assert url_out == f"s3://{s3.bucket}/{key}"
            body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
            original = images.files["/" + url_in.rsplit("/", 1)[1]][1]
            assert len(body) < len(original)
            img = Image.open(io.BytesIO(body))
            img.load()
            if ext == "jpg":
                assert img.size == (200, 400)  # EXIF orientation applied
                assert 0x0112 not in img.getexif() and 0x010F not in img.getexif()  # metadata stripped
    out_csv = (
        client.get_object(Bucket=s3.bucket, Key=f"{s3_prefix}/images/{done.request_id}/output.csv")["Body"]
        .read()
        .decode()
    )
    assert out_csv.splitlines()[0] == "S. No.,Product Name,Input Image Urls,Output Image Urls"
    assert rows[1].output_image_urls[2] in out_csv.splitlines()[2]
    assert done.output_csv_url == f"s3://{s3.bucket}/{s3_prefix}/images/{done.request_id}/output.csv"


def test_bad_images_keep_their_errors_and_the_rest_succeed(
    images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    base = images.url
    data = (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,Mixed,"{base}/a.jpg,{base}/missing.jpg,{base}/slow.jpg"\n'
        f'2,Broken,"{base}/fake.jpg,{base}/bomb.png,{base}/loop"\n'
    ).encode()
    done = run_request(store, data, s3, options(s3, s3_prefix), tmp_path)
    assert done.status is RequestStatus.COMPLETED  # one image succeeded
    mixed, broken = store.list_request_rows(done.request_id)
    assert mixed.output_image_urls[0] and mixed.output_image_urls[1:] == [None, None]
    assert "HTTP 404" in mixed.errors[1] and "timed out" in mixed.errors[2]
    assert broken.output_image_urls == [None, None, None]
    assert "not a JPEG, PNG" in broken.errors[0]
    assert "decompression bomb" in broken.errors[1]
    assert "redirects" in broken.errors[2]
    assert any("row 2 image 2" in e for e in done.errors)

    only_bad = run_request(
        store,
        f'S. No.,Product Name,Input Image Urls\n1,X,"{base}/missing.jpg"\n'.encode(),
        s3,
        options(s3, s3_prefix),
        tmp_path,
    )
    assert only_bad.status is RequestStatus.FAILED


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"S. No.,Product Name\n1,Shirt\n", "missing column(s) 'input image urls'"),
        (b"S. No.,Product Name,Input Image Urls,Extra\n1,A,http://x/a.jpg,z\n", "unexpected column(s) 'Extra'"),
        (b"S. No.,Product Name,Input Image Urls\n1,,http://x/a.jpg\n", "row 2: empty Product Name"),
        (
            b"S. No.,Product Name,Input Image Urls\n1,A,ftp://x/a.jpg\n",
            "row 2: 'ftp://x/a.jpg' is not an http(s) or s3 URL",
        ),
        (
            b"S. No.,Product Name,Input Image Urls\n1,A,http://x/a.jpg\n1,B,http://x/b.jpg\n",
            "row 3: duplicate S. No. 1 (first on row 2)",
        ),
        (b"", "file is empty"),
    ],
)
def test_bad_csv_fails_with_every_problem_and_uploads_nothing(
    body: bytes, problem: str, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    with pytest.raises(InvalidRequestCsv) as info:
        processor.submit(store, body, "bad.csv", request_id="req-bad")
    assert problem in str(info.value)
    request = store.require_request("req-bad")
    assert request.status is RequestStatus.FAILED and any(problem in e for e in request.errors)
    assert s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3_prefix}/").get("KeyCount", 0) == 0


def test_header_routing_is_case_and_space_insensitive(tmp_path: Path) -> None:
    f = tmp_path / "whatever_name.csv"
    f.write_text("s. no. , PRODUCT  NAME,input image urls\n1,A,http://x/a.jpg\n")
    assert looks_like_request_csv(f)
    assert parse_request_csv(f.read_bytes())[0].product_name == "A"
    (tmp_path / "promo.csv").write_text("userId,promoCode\n")
    assert not looks_like_request_csv(tmp_path / "promo.csv")


def test_process_of_a_product_csv_prints_its_requests_outcome(deployment: Deployment) -> None:
    """`s3proc process` routes a product CSV as the sensor does; it has no file record, so
    the line printed is its image request's (it stopped on a KeyError once the run had ended)."""
    from s3proc_dagster_tests.pipeline_helpers import start_process

    path = deployment.watch / "img-process" / "catalogue.csv"
    path.parent.mkdir()
    path.write_text("S. No.,Product Name,Input Image Urls\n1,A,ftp://127.0.0.1/a.jpg\n")
    proc = start_process(str(path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err, err
    (line,) = out.splitlines()
    assert line.startswith("FAILED: image request req-") and "is not an http(s) or s3 URL" in line, line
    assert str(path) in line


def test_image_request_job_runs_from_the_watch_directory(deployment: Deployment, images: ImageServer) -> None:
    from s3proc_dagster_tests.pipeline_helpers import run_requests_under, sensor_tick

    path = deployment.watch / "img" / "catalogue.csv"
    path.parent.mkdir()
    path.write_bytes(good_csv(images.url))
    (request,) = run_requests_under(sensor_tick(deployment), "img")
    assert request.job_name == "image_request_job"  # routed by header, not by name
    from s3proc_dagster.runs.reconstructable import image_request_job_with_resources

    result = dg.execute_job(
        dg.reconstructable(image_request_job_with_resources),
        instance=deployment.instance(),
        run_config=request.run_config,
        tags=request.tags,
    )
    assert result.success
    request_id = deployment.instance().get_run_by_id(result.run_id).tags["s3proc/request_id"]
    store = deployment.store()
    assert store.require_request(request_id).status is RequestStatus.COMPLETED
    materialized = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert len(materialized) == 7  # one per image
    status = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "images", "status", request_id, "--json"],
        cwd=COMMAND_DIR,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    doc = json.loads(status.stdout)
    assert doc["status"] == "completed" and [r["serialNumber"] for r in doc["rows"]] == [1, 2, 3]
    assert all(all(u.startswith("s3://") for u in r["outputImageUrls"]) for r in doc["rows"])


class WebhookReceiver:
    """A webhook endpoint on loopback: `received` holds each POST's body; the first answers
    come from `answers` (status codes), every later one is 200."""

    def __init__(self, answers: tuple[int, ...] = ()) -> None:
        self.received: list[bytes] = []
        pending, received = list(answers), self.received

        class Hook(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                received.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(pending.pop(0) if pending else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def documents(self) -> list[dict]:
        return [json.loads(body) for body in self.received]


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> WebhookReceiver:
    """A receiver, set as IMAGE_WEBHOOK_URL for the runs this test starts."""
    receiver = WebhookReceiver()
    monkeypatch.setenv("IMAGE_WEBHOOK_URL", receiver.url)
    yield receiver
    receiver.server.shutdown()


@pytest.mark.servers  # its own receiver, started in the test: no fixture to mark it by
def test_webhook_is_retried_until_the_receiver_accepts() -> None:
    from s3proc_dagster.images.webhook import post_result

    receiver = WebhookReceiver(answers=(503,))
    try:
        status = post_result(receiver.url, b'{"requestId": "r1"}', attempts=3, delay_s=0.01)
    finally:
        receiver.server.shutdown()
    assert status == 200 and receiver.received == [b'{"requestId": "r1"}'] * 2


@pytest.mark.servers  # its own receiver, started in the test
def test_webhook_is_not_retried_when_the_receiver_refuses_the_request() -> None:
    from s3proc_dagster.images.webhook import post_result

    receiver = WebhookReceiver(answers=(404, 404))
    try:
        status = post_result(receiver.url, b"{}", attempts=3, delay_s=0.01)
    finally:
        receiver.server.shutdown()
    assert status == 404 and len(receiver.received) == 1  # a 4xx says the same on every attempt


# --- Bounds: one overall deadline per fetch, every fetch error the image's, no request left processing ---


@pytest.mark.parametrize("path", ["/drip-headers.jpg", "/drip-body.jpg"])
def test_a_host_dripping_bytes_meets_the_overall_deadline(images: ImageServer, path: str) -> None:
    """One byte every 0.5 s never lets a 1 s read time out; the 2 s deadline ends the fetch."""
    from s3proc_dagster.images.fetch import FetchError, fetch_image

    url = f"{images.url}{path}"
    with pytest.raises(FetchError) as info:
        fetch_image(url, timeout=(1.0, 1.0), allow_private=True, deadline_s=2.0)
    assert str(info.value) == f"{url}: no complete response within 2.0 s (overall deadline)"
    assert info.value.transient is False  # a whole budget spent: not worth another one


@pytest.mark.servers  # its own TLS server, started in the test
def test_the_deadline_cuts_a_dripping_body_over_tls_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS wraps (and detaches) the socket the deadline registered; shutting its duplicate
    down must still end the read blocked inside the TLS layer."""
    from s3proc_dagster.images.fetch import FetchError, fetch_image

    context, ca_file = tls_context_for("cdn.example.test", tmp_path)
    server = ImageServer(tls=context)
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
        net = FakeNetwork(server.port, {"cdn.example.test": [[PUBLIC_IP]]})
        url = f"https://cdn.example.test:{server.port}/drip-body.jpg"
        with pytest.raises(FetchError) as info:
            fetch_image(url, timeout=(1.0, 1.0), guard=net.guard, deadline_s=2.0)
    finally:
        server.server.shutdown()
    assert str(info.value) == f"{url}: no complete response within 2.0 s (overall deadline)"
    assert server.sni == ["cdn.example.test"]  # it was the TLS path that was cut


def test_a_bad_content_length_or_gzip_body_is_the_images_error_and_the_request_settles(
    images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    base = images.url
    data = (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,Shirt,"{base}/a.jpg,{base}/bad-length.jpg"\n'
        f'2,Mug,"{base}/bad-gzip.jpg"\n'
    ).encode()
    done = run_request(store, data, s3, options(s3, s3_prefix), tmp_path)
    assert done.status is RequestStatus.COMPLETED  # a.jpg succeeded
    shirt, mug = store.list_request_rows(done.request_id)
    assert shirt.output_image_urls[0] and shirt.output_image_urls[1] is None
    assert shirt.errors[1] == f"{base}/bad-length.jpg: Content-Length 'abc' is not a byte count"
    assert mug.errors == [f"{base}/bad-gzip.jpg: body does not decode as its Content-Encoding 'gzip' says"]
    assert shirt.completed_at is not None and mug.completed_at is not None
    assert [e.split(":")[0] for e in done.errors] == ["row 1 image 2", "row 2 image 1"]

    only_bad = run_request(
        store,
        f'S. No.,Product Name,Input Image Urls\n1,X,"{base}/bad-gzip.jpg"\n'.encode(),
        s3,
        options(s3, s3_prefix),
        tmp_path,
    )
    assert only_bad.status is RequestStatus.FAILED and "Content-Encoding 'gzip'" in only_bad.errors[0]


def run_image_job(deployment: Deployment, csv_path: Path, request_id: str) -> dg.ExecuteJobResult:
    """image_request_job on the deployment's instance for the CSV at `csv_path`, under a
    request id the test chose (so it can aim the S3 proxy's faults at its keys)."""
    from s3proc_dagster.runs.reconstructable import image_request_job_with_resources

    return dg.execute_job(
        dg.reconstructable(image_request_job_with_resources),
        instance=deployment.instance(),
        run_config={"ops": {"validate_request": {"config": {"path": str(csv_path), "request_id": request_id}}}},
        tags={"s3proc/kind": "image_request"},
    )


@pytest.mark.parametrize(
    "names, status",
    [(["a.jpg", "drip-body.jpg"], RequestStatus.COMPLETED), (["drip-body.jpg"], RequestStatus.FAILED)],
)
def test_a_dripping_host_fails_its_image_at_the_deadline_and_the_request_settles_with_the_webhook(
    deployment: Deployment,
    images: ImageServer,
    webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    names: list[str],
    status: RequestStatus,
) -> None:
    monkeypatch.setenv("IMAGE_FETCH_TIMEOUT_MS", "1000")
    monkeypatch.setenv("IMAGE_FETCH_DEADLINE_MS", "2000")
    urls = ",".join(f"{images.url}/{name}" for name in names)
    csv_path = tmp_path / "products.csv"
    csv_path.write_text(f'S. No.,Product Name,Input Image Urls\n1,Shirt,"{urls}"\n')
    request_id = processor.new_request_id()
    served = len(images.seen)
    result = run_image_job(deployment, csv_path, request_id)
    assert result.success is (status is RequestStatus.COMPLETED)  # no image at all fails the run
    request = deployment.store().require_request(request_id)
    assert request.status is status
    (row,) = deployment.store().list_request_rows(request_id)
    reason = f"{images.url}/drip-body.jpg: no complete response within 2.0 s (overall deadline)"
    assert row.errors[-1] == reason and row.output_image_urls[-1] is None
    assert [p for p, _ in images.seen[served:]].count("/drip-body.jpg") == 1  # not retried
    (doc,) = webhook.documents()
    assert doc["requestId"] == request_id and doc["status"] == status.value
    assert doc["rows"][0]["errors"][-1] == reason


def test_a_run_whose_step_raises_leaves_the_request_failed_with_the_reason_and_sends_the_webhook(
    deployment: Deployment, images: ImageServer, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    """S3 refusing row 1's uploads is no image's fault: the step raises, the run fails, and
    the failure hook settles the request (finalize_request never runs)."""
    csv_path = tmp_path / "products.csv"
    csv_path.write_text(good_csv(images.url).decode())
    request_id = processor.new_request_id()
    deployment.proxy.fail_puts_containing = f"/{request_id}/1/"  # row 1's images; the output CSV still lands
    try:
        result = run_image_job(deployment, csv_path, request_id)
    finally:
        deployment.proxy.fail_puts_containing = None
    assert not result.success
    failed_steps = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed_steps == ["process_image_row[row_1]"]
    request = deployment.store().require_request(request_id)
    assert request.status is RequestStatus.FAILED
    assert request.errors[0].startswith("process_image_row[row_1]: ") and "ServiceUnavailable" in request.errors[0]
    key = f"{deployment.prefix}/images/{request_id}/output.csv"
    assert request.output_csv_url == f"s3://{deployment.s3.bucket}/{key}"
    out_csv = deployment.s3.client().get_object(Bucket=deployment.s3.bucket, Key=key)["Body"].read().decode()
    assert out_csv.splitlines()[0].endswith("Output Image Urls")
    (doc,) = webhook.documents()  # once: the other rows' steps succeeded, and nothing settles it twice
    assert doc["requestId"] == request_id and doc["status"] == "failed" and doc["errors"] == request.errors


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink_to_a_secret(path: Path) -> None:
    secret = path.with_name("secret.csv")
    secret.write_text("S. No.,Product Name,Input Image Urls\n1,A,http://x/a.jpg\n")
    path.symlink_to(secret)


@pytest.mark.parametrize(
    "make, reason",
    [
        (
            lambda p: p.write_text("S. No.,Product Name,Input Image Urls\n" + "1,A,http://x/a.jpg\n" * 40),
            "file is 797 bytes, over the 512-byte limit (IMAGE_CSV_MAX_BYTES)",
        ),
        (
            lambda p: p.write_text(
                "S. No.,Product Name,Input Image Urls\n" + "".join(f"{i},A,http://x/a.jpg\n" for i in range(1, 5))
            ),
            "more than 3 rows (IMAGE_CSV_MAX_ROWS)",
        ),
        (_symlink_to_a_secret, "products.csv: is (or passes through) a symbolic link; links are never followed"),
        (_fifo, "products.csv: not a regular file (only regular files are processed)"),
    ],
    ids=["over-bytes", "over-rows", "symlink", "fifo"],
)
def test_a_csv_over_a_cap_or_not_a_regular_file_is_refused_with_its_reason(tmp_path: Path, make, reason: str) -> None:
    store = SQLiteProgressStore(tmp_path / "p.db")
    path = tmp_path / "products.csv"
    make(path)
    with pytest.raises(InvalidRequestCsv) as info:
        processor.submit_file(store, path, "req-capped", max_bytes=512, max_rows=3)
    assert reason in str(info.value)
    request = store.require_request("req-capped")
    assert request.status is RequestStatus.FAILED and len(request.errors) == 1 and reason in request.errors[0]
    assert store.list_request_rows("req-capped") == []


def test_the_row_cap_setting_refuses_a_longer_csv_in_the_job(
    deployment: Deployment, images: ImageServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IMAGE_CSV_MAX_ROWS", "2")
    csv_path = tmp_path / "products.csv"
    csv_path.write_text(good_csv(images.url).decode())  # three rows
    request_id = processor.new_request_id()
    served = len(images.seen)
    result = run_image_job(deployment, csv_path, request_id)
    assert not result.success
    request = deployment.store().require_request(request_id)
    assert request.status is RequestStatus.FAILED and request.errors == ["more than 2 rows (IMAGE_CSV_MAX_ROWS)"]
    assert len(images.seen) == served  # refused before any image was fetched


# --- Private destinations (SSRF): the CSV's URLs are user input -------------------------------

REFUSE_HINT = "(set IMAGE_ALLOW_PRIVATE_URLS=true to allow private destinations)"
PUBLIC_IP = "93.184.216.34"  # a public address; FakeNetwork routes it to the loopback server


class FakeNetwork:
    """DNS and routing for a DestinationGuard, so a public-looking name can be served by the
    loopback image server on an offline machine.

    `names` maps a host to its successive answers (the last one repeats; an IP literal
    answers itself, as getaddrinfo does). Only PUBLIC_IP is routable; it leads to `port`.
    """

    def __init__(self, port: int, names: dict[str, list[list[str]]]) -> None:
        self.port = port
        self.names = {host: list(answers) for host, answers in names.items()}
        self.lookups: list[str] = []
        self.dials: list[tuple[str, int]] = []

    def resolve(self, host: str, _port: int) -> list[str]:
        self.lookups.append(host)
        answers = self.names.get(host, [[host]])
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def connect(self, address: tuple[str, int], *args, **kwargs):
        from urllib3.util.connection import create_connection

        self.dials.append(address)
        if address[0] != PUBLIC_IP:
            raise ConnectionRefusedError(f"{address[0]} is unreachable in this test")
        return create_connection(("127.0.0.1", self.port), *args, **kwargs)

    @property
    def guard(self):
        from s3proc_dagster.images.egress import DestinationGuard

        return DestinationGuard(resolve=self.resolve, connect=self.connect)


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "LOOPBACK"),
        ("127.8.9.10", "LOOPBACK"),
        ("::1", "LOOPBACK"),
        ("::ffff:127.0.0.1", "LOOPBACK"),
        ("64:ff9b::7f00:1", "LOOPBACK"),
        ("0.0.0.0", "UNSPECIFIED"),
        ("0.1.2.3", "UNSPECIFIED"),
        ("::", "UNSPECIFIED"),
        ("::ffff:0.0.0.0", "UNSPECIFIED"),
        ("169.254.169.254", "LINK_LOCAL"),
        ("169.254.0.1", "LINK_LOCAL"),
        ("::ffff:169.254.169.254", "LINK_LOCAL"),
        ("fe80::1", "LINK_LOCAL"),
        ("fe80::1%eth0", "LINK_LOCAL"),
        ("febf::1", "LINK_LOCAL"),
        ("10.0.0.1", "PRIVATE"),
        ("10.255.255.255", "PRIVATE"),
        ("172.16.0.1", "PRIVATE"),
        ("172.31.255.254", "PRIVATE"),
        ("192.168.1.1", "PRIVATE"),
        ("::ffff:10.1.2.3", "PRIVATE"),
        ("fc00::1", "PRIVATE"),
        ("fd12:3456:789a::1", "PRIVATE"),
        ("100.64.0.1", "SHARED"),
        ("100.127.255.254", "SHARED"),
        ("224.0.0.1", "MULTICAST"),
        ("239.255.255.250", "MULTICAST"),
        ("ff02::1", "MULTICAST"),
        ("ff0e::fb", "MULTICAST"),
        ("255.255.255.255", "RESERVED"),
        ("240.0.0.1", "RESERVED"),
        ("192.0.2.10", "RESERVED"),
        ("198.18.0.1", "RESERVED"),
        ("2001:db8::1", "RESERVED"),
        ("2002:7f00:1::", "RESERVED"),
        ("::7f00:1", "RESERVED"),
    ],
)
def test_non_public_addresses_are_classified_by_kind(address: str, kind: str) -> None:
    from s3proc_dagster.images.egress import AddressKind, classify_address

    assert classify_address(address) is AddressKind[kind]


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        PUBLIC_IP,
        "172.32.0.1",
        "172.15.255.255",
        "100.128.0.1",
        "100.63.255.255",
        "11.0.0.1",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    from s3proc_dagster.images.egress import classify_address

    assert classify_address(address) is None


def test_a_host_is_refused_when_any_of_its_addresses_is_private() -> None:
    from s3proc_dagster.images.egress import DestinationGuard, DestinationRefused

    net = FakeNetwork(0, {"mixed.example.test": [[PUBLIC_IP, "10.1.2.3"]], "cdn.example.test": [[PUBLIC_IP]]})
    guard = DestinationGuard(resolve=net.resolve, connect=net.connect)
    assert guard.vet("cdn.example.test", 80) == [PUBLIC_IP]
    with pytest.raises(DestinationRefused) as info:
        guard.vet("mixed.example.test", 80)
    assert str(info.value) == f"mixed.example.test resolves to 10.1.2.3, a private address {REFUSE_HINT}"
    with pytest.raises(DestinationRefused) as info:
        guard.vet("[::ffff:127.0.0.1]", 80)  # urllib3 hands IPv6 hosts over in brackets
    assert str(info.value) == f"::ffff:127.0.0.1 is a loopback address {REFUSE_HINT}"
    assert net.dials == []


def test_a_public_name_is_reached_at_the_checked_address_with_its_own_host_header(images: ImageServer) -> None:
    """DNS rebinding: the name answers public for the check, then 127.0.0.1. The connection
    must go to the address that was checked, without asking DNS again."""
    from s3proc_dagster.images.fetch import fetch_image

    net = FakeNetwork(images.port, {"cdn.example.test": [[PUBLIC_IP], ["127.0.0.1"]]})
    url = f"http://cdn.example.test:{images.port}/a.jpg"
    fetched = fetch_image(url, guard=net.guard)
    assert fetched.data == images.files["/a.jpg"][1]
    assert net.lookups == ["cdn.example.test"] and net.dials == [(PUBLIC_IP, images.port)]
    assert images.seen[-1] == ("/a.jpg", f"cdn.example.test:{images.port}")


def test_a_redirect_to_cloud_metadata_is_refused_at_that_hop(images: ImageServer) -> None:
    from s3proc_dagster.images.fetch import FetchError, fetch_image

    net = FakeNetwork(images.port, {"cdn.example.test": [[PUBLIC_IP]]})
    url = f"http://cdn.example.test:{images.port}/to-metadata"
    with pytest.raises(FetchError) as info:
        fetch_image(url, guard=net.guard)
    assert str(info.value) == (
        f"{url}: refused: redirect to http://169.254.169.254/latest/meta-data/: "
        f"169.254.169.254 is a link-local address {REFUSE_HINT}"
    )
    assert info.value.transient is False  # permanent: retrying cannot make it allowed
    assert images.seen[-1] == ("/to-metadata", f"cdn.example.test:{images.port}")  # the first hop was served
    assert net.dials == [(PUBLIC_IP, images.port)]  # and nothing dialled the metadata address


@pytest.mark.parametrize(
    "path, reason",
    [
        (
            "/to-mixed",
            f"redirect to http://mixed.example.test/a.jpg: mixed.example.test resolves to 10.9.8.7, a private address {REFUSE_HINT}",
        ),
        ("/to-file", "redirect to file:///etc/passwd: only http(s) redirects are followed"),
    ],
)
def test_a_redirect_hop_is_checked_like_the_first_url(images: ImageServer, path: str, reason: str) -> None:
    from s3proc_dagster.images.fetch import FetchError, fetch_image

    net = FakeNetwork(images.port, {"cdn.example.test": [[PUBLIC_IP]], "mixed.example.test": [[PUBLIC_IP, "10.9.8.7"]]})
    url = f"http://cdn.example.test:{images.port}{path}"
    with pytest.raises(FetchError) as info:
        fetch_image(url, guard=net.guard)
    assert reason in str(info.value) and info.value.transient is False
    assert net.dials == [(PUBLIC_IP, images.port)]


def test_a_configured_proxy_is_refused_rather_than_trusted_to_check(
    images: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3proc_dagster.images.fetch import FetchError, fetch_image

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.test:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    net = FakeNetwork(images.port, {"cdn.example.test": [[PUBLIC_IP]]})
    with pytest.raises(FetchError, match=r"a proxy \(http://proxy\.example\.test:3128\) would resolve and reach"):
        fetch_image(f"http://cdn.example.test:{images.port}/a.jpg", guard=net.guard)
    assert net.dials == []


def tls_context_for(hostname: str, directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a certificate for `hostname` from a fresh CA, and the CA's file."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3proc test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_file


@pytest.mark.servers  # its own TLS server, started in the test
def test_https_to_a_pinned_address_keeps_sni_and_checks_the_certificate_against_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from s3proc_dagster.images.fetch import FetchError, fetch_image

    context, ca_file = tls_context_for("cdn.example.test", tmp_path)
    server = ImageServer(tls=context)
    try:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))  # requests' own way to trust a CA
        net = FakeNetwork(server.port, {"cdn.example.test": [[PUBLIC_IP]], "other.example.test": [[PUBLIC_IP]]})
        fetched = fetch_image(f"https://cdn.example.test:{server.port}/b.png", guard=net.guard)
        assert fetched.data == server.files["/b.png"][1]
        assert server.sni == ["cdn.example.test"] and server.seen == [("/b.png", f"cdn.example.test:{server.port}")]
        # Same pinned address, another name: the certificate is checked against the name, not skipped.
        with pytest.raises(FetchError, match="connection failed"):
            fetch_image(f"https://other.example.test:{server.port}/b.png", guard=net.guard)
        assert len(server.seen) == 1
    finally:
        server.server.shutdown()


def private_csv(images: ImageServer, s3_image: str) -> bytes:
    return (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,Shirt,"{images.url}/a.jpg"\n'
        f'2,Mug,"{s3_image}"\n'
        f'3,Hat,"{images.url}/to-metadata"\n'
    ).encode()


def test_private_urls_are_refused_with_the_reason_while_the_other_rows_complete(
    store: ProgressStore, images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=f"{s3_prefix}/src/b.png", Body=images.files["/b.png"][1])
    served = len(images.seen)
    done = run_request(
        store,
        private_csv(images, f"s3://{s3.bucket}/{s3_prefix}/src/b.png"),
        s3,
        options(s3, s3_prefix, allow_private_urls=False),
        tmp_path,
    )
    assert done.status is RequestStatus.COMPLETED  # the s3:// image is not affected
    shirt, mug, hat = store.list_request_rows(done.request_id)
    assert shirt.output_image_urls == [None] and hat.output_image_urls == [None]
    assert shirt.errors == [f"{images.url}/a.jpg: refused: 127.0.0.1 is a loopback address {REFUSE_HINT}"]
    assert hat.errors == [f"{images.url}/to-metadata: refused: 127.0.0.1 is a loopback address {REFUSE_HINT}"]
    assert mug.output_image_urls[0] and mug.errors == [None]
    assert all(r.completed_at is not None for r in (shirt, mug, hat))
    assert [e.split(":")[0] for e in done.errors] == ["row 1 image 1", "row 3 image 1"]
    assert len(images.seen) == served  # refused before connecting: the server never saw them


def test_an_s3_image_outside_the_allowed_prefixes_is_refused_and_never_copied(
    store: ProgressStore, images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    png = images.files["/b.png"][1]
    s3.client().put_object(Bucket=s3.bucket, Key=f"{s3_prefix}/src/ok.png", Body=png)
    s3.client().put_object(Bucket=s3.bucket, Key=f"{s3_prefix}/_s3proc/plant.png", Body=png)
    s3.client().put_object(Bucket=s3.bucket, Key=f"t-secret-{s3_prefix}/hr.png", Body=png)  # outside S3_PREFIX
    data = (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,Ok,"s3://{s3.bucket}/{s3_prefix}/src/ok.png"\n'
        f'2,Elsewhere,"s3://{s3.bucket}/t-secret-{s3_prefix}/hr.png"\n'
        f'3,Reserved,"s3://{s3.bucket}/{s3_prefix}/_s3proc/plant.png"\n'
        f'4,Respelled,"s3://{s3.bucket}/{s3_prefix}//_s3proc/plant.png"\n'  # SeaweedFS reads `//` as `/`
        f'5,Backslashed,"s3://{s3.bucket}/{s3_prefix}/\\_s3proc/plant.png"\n'  # and `\` as `/`
    ).encode()
    opts = options(s3, s3_prefix, s3_refused=(f"{s3.bucket}/{s3_prefix}/_s3proc",))
    done = run_request(store, data, s3, opts, tmp_path)
    ok, elsewhere, reserved, respelled, backslashed = store.list_request_rows(done.request_id)
    assert ok.output_image_urls[0] and ok.errors == [None]
    for row in (elsewhere, reserved):
        assert row.output_image_urls == [None] and "refused: s3:// images are read only below" in row.errors[0]
    for row in (respelled, backslashed):  # the backslashed one was read from the refused folder
        assert row.output_image_urls == [None] and "refused: not one canonical key" in row.errors[0]
    copies = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3_prefix}/images/{done.request_id}/")
    assert [o["Key"].split("/")[-2] for o in copies.get("Contents", []) if not o["Key"].endswith(".csv")] == ["1"]


def test_private_urls_are_fetched_when_the_setting_allows_them(
    store: ProgressStore, images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path
) -> None:
    data = f'S. No.,Product Name,Input Image Urls\n1,Shirt,"{images.url}/a.jpg"\n'.encode()
    done = run_request(store, data, s3, options(s3, s3_prefix, allow_private_urls=True), tmp_path)
    assert done.status is RequestStatus.COMPLETED and done.errors == []
    (shirt,) = store.list_request_rows(done.request_id)
    assert shirt.output_image_urls[0] and shirt.errors == [None]


@pytest.mark.usefixtures("pipeline_env")
def test_the_allow_setting_reaches_the_ops_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from s3proc_dagster.defs.images.ops import _options
    from s3proc_dagster.defs.resources import Settings

    monkeypatch.delenv("IMAGE_ALLOW_PRIVATE_URLS", raising=False)  # the session's deployment sets it
    assert _options(Settings()).allow_private_urls is False  # the default
    monkeypatch.setenv("IMAGE_ALLOW_PRIVATE_URLS", "true")  # settings are read per run, not at import
    assert _options(Settings()).allow_private_urls is True
