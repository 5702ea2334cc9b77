"""Seed 002 image requests against a real HTTP server on loopback and SeaweedFS."""

from __future__ import annotations

import io
import json
import os
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

from s3proc_dagster.images import processor
from s3proc_dagster.images.request_csv import InvalidRequestCsv, looks_like_request_csv, parse_request_csv
from s3proc_dagster.models import RequestStatus
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.stores.mongo import MongoProgressStore
from s3proc_dagster.stores.sqlite import SQLiteProgressStore
from s3proc_dagster_tests.conftest import Deployment, S3Endpoint

ROOT = Path(__file__).resolve().parents[1]


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
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


class ImageServer:
    def __init__(self) -> None:
        self.files = {
            "/a.jpg": ("image/jpeg", jpeg_rotated()),
            "/b.png": ("image/png", png_alpha()),
            "/c.webp": ("image/webp", webp()),
            "/fake.jpg": ("image/jpeg", b"<html>not an image</html>" * 10),
            "/bomb.png": ("image/png", png_bomb()),
        }
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/slow.jpg":
                    time.sleep(3)  # the server is slow; the client's timeout is what is tested
                if self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
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

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
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
    return processor.ImageOptions(bucket=s3.bucket, prefix=prefix, fetch_timeout_s=1.0, retries=1, retry_delay_s=0.05, **kw)


def run_request(store: ProgressStore, data: bytes, s3: S3Endpoint, opts: processor.ImageOptions, tmp: Path):
    request = processor.submit(store, data, "products.csv")
    store.set_request_status(request.request_id, RequestStatus.PROCESSING)
    for row in store.list_request_rows(request.request_id):
        processor.process_row(store, row, s3.client(), opts, tmp)
    return processor.finalize(store, request.request_id, s3.client(), opts, tmp)


@pytest.fixture(params=["sqlite", "mongodb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ProgressStore:
    if request.param == "sqlite":
        opened: ProgressStore = SQLiteProgressStore(tmp_path / "p.db")
    else:
        opened = MongoProgressStore(request.getfixturevalue("mongodb_uri"), request.getfixturevalue("mongodb_database"))
    yield opened
    opened.close()


def test_three_rows_compress_in_order_and_complete(store: ProgressStore, images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
    done = run_request(store, good_csv(images.url), s3, options(s3, s3_prefix), tmp_path)
    assert done.status is RequestStatus.COMPLETED and done.errors == []
    rows = store.list_request_rows(done.request_id)
    assert [r.serial_number for r in rows] == [1, 2, 3]
    client = s3.client()
    for row in rows:
        assert row.completed_at is not None and row.created_at is not None
        assert len(row.output_image_urls) == len(row.input_image_urls)
        for n, (url_in, url_out) in enumerate(zip(row.input_image_urls, row.output_image_urls), start=1):
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
    out_csv = client.get_object(Bucket=s3.bucket, Key=f"{s3_prefix}/images/{done.request_id}/output.csv")["Body"].read().decode()
    assert out_csv.splitlines()[0] == "S. No.,Product Name,Input Image Urls,Output Image Urls"
    assert rows[1].output_image_urls[2] in out_csv.splitlines()[2]
    assert done.output_csv_url == f"s3://{s3.bucket}/{s3_prefix}/images/{done.request_id}/output.csv"


def test_bad_images_keep_their_errors_and_the_rest_succeed(images: ImageServer, s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
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

    only_bad = run_request(store, f'S. No.,Product Name,Input Image Urls\n1,X,"{base}/missing.jpg"\n'.encode(), s3, options(s3, s3_prefix), tmp_path)
    assert only_bad.status is RequestStatus.FAILED


@pytest.mark.parametrize(
    "body, problem",
    [
        (b"S. No.,Product Name\n1,Shirt\n", "missing column(s) 'input image urls'"),
        (b"S. No.,Product Name,Input Image Urls,Extra\n1,A,http://x/a.jpg,z\n", "unexpected column(s) 'Extra'"),
        (b"S. No.,Product Name,Input Image Urls\n1,,http://x/a.jpg\n", "row 2: empty Product Name"),
        (b"S. No.,Product Name,Input Image Urls\n1,A,ftp://x/a.jpg\n", "row 2: 'ftp://x/a.jpg' is not an http(s) or s3 URL"),
        (b"S. No.,Product Name,Input Image Urls\n1,A,http://x/a.jpg\n1,B,http://x/b.jpg\n", "row 3: duplicate S. No. 1 (first on row 2)"),
        (b"", "file is empty"),
    ],
)
def test_bad_csv_fails_with_every_problem_and_uploads_nothing(body: bytes, problem: str, s3: S3Endpoint, s3_prefix: str, tmp_path: Path) -> None:
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


def test_image_request_job_runs_from_the_watch_directory(deployment: Deployment, images: ImageServer) -> None:
    from s3proc_dagster_tests.pipeline_helpers import run_requests_under, sensor_tick

    path = deployment.watch / "img" / "catalogue.csv"
    path.parent.mkdir()
    path.write_bytes(good_csv(images.url))
    (request,) = run_requests_under(sensor_tick(deployment), "img")
    assert request.job_name == "image_request_job"  # routed by header, not by name
    from s3proc_dagster.cli_images import image_request_job_with_resources

    result = dg.execute_job(
        dg.reconstructable(image_request_job_with_resources), instance=deployment.instance(),
        run_config=request.run_config, tags=request.tags,
    )
    assert result.success
    request_id = deployment.instance().get_run_by_id(result.run_id).tags["s3proc/request_id"]
    store = deployment.store()
    assert store.require_request(request_id).status is RequestStatus.COMPLETED
    materialized = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert len(materialized) == 7  # one per image
    status = subprocess.run(
        [sys.executable, "-m", "s3proc_dagster.cli", "images", "status", request_id, "--json"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120,
    )
    doc = json.loads(status.stdout)
    assert doc["status"] == "completed" and [r["serialNumber"] for r in doc["rows"]] == [1, 2, 3]
    assert all(all(u.startswith("s3://") for u in r["outputImageUrls"]) for r in doc["rows"])


def test_webhook_is_retried_until_the_receiver_accepts() -> None:
    from s3proc_dagster.images.webhook import post_result

    received: list[bytes] = []

    class Hook(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(503 if len(received) == 1 else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status = post_result(f"http://127.0.0.1:{server.server_address[1]}/hook", b'{"requestId": "r1"}', attempts=3, delay_s=0.01)
    finally:
        server.shutdown()
    assert status == 200 and received == [b'{"requestId": "r1"}'] * 2
