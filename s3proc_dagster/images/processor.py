"""One image request from CSV to compressed images and an output CSV, tracked row by row.

A row's image that cannot be fetched or decoded keeps its error on its RequestData record
and the other images go on; the request ends `failed` only when no image at all
succeeded. Uploads go through the same streaming uploader and verification as the file
pipeline.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from s3proc_dagster.errors import ChecksumMismatch, ImageRequestError, is_transient
from s3proc_dagster.files.private import make_private_dir
from s3proc_dagster.images.compress import compress
from s3proc_dagster.images.fetch import FetchError, fetch_image
from s3proc_dagster.images.request_csv import (
    MAX_CSV_BYTES,
    MAX_CSV_ROWS,
    InvalidRequestCsv,
    ProductRow,
    output_csv,
    parse_request_csv,
    read_request_csv,
)
from s3proc_dagster.models import Request, RequestData, RequestStatus
from s3proc_dagster.settings import IMAGE_OUTPUT_FOLDER
from s3proc_dagster.stores.base import ProgressStore
from s3proc_dagster.transfer.keys import join_key
from s3proc_dagster.transfer.upload import upload_file
from s3proc_dagster.transfer.verify import verify_object


@dataclass(frozen=True)
class ImageOptions:
    bucket: str
    prefix: str
    quality: int = 50
    output_format: str | None = None
    public_base_url: str = ""
    fetch_timeout_s: float = 15.0  # each connect and each read
    fetch_deadline_s: float = 60.0  # the whole fetch of one image, redirects and body included
    max_bytes: int = 25 * 1024 * 1024
    retries: int = 2
    retry_delay_s: float = 0.5
    allow_private_urls: bool = False  # IMAGE_ALLOW_PRIVATE_URLS: fetch from loopback/private addresses too
    # s3:// images are read only below these `bucket/prefix` roots, never below `s3_refused`
    # (IMAGE_S3_SOURCES; by default S3_PREFIX of the bucket): the CSV is not the operator's
    s3_sources: tuple[str, ...] | None = None  # None: `bucket/prefix`
    s3_refused: tuple[str, ...] = ()
    csv_max_bytes: int = MAX_CSV_BYTES
    csv_max_rows: int = MAX_CSV_ROWS


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def _record_invalid(store: ProgressStore, request_id: str, name: str, exc: InvalidRequestCsv) -> None:
    store.create_request(Request(request_id=request_id, file_name=name), [])
    store.set_request_status(request_id, RequestStatus.FAILED, errors=exc.problems)


def submit(
    store: ProgressStore, data: bytes, name: str, request_id: str | None = None, max_rows: int = MAX_CSV_ROWS
) -> Request:
    """Validate and record a request. An invalid CSV is recorded FAILED, with every problem
    listed by row, and InvalidRequestCsv is raised: nothing will be fetched for it."""
    request_id = request_id or new_request_id()
    try:
        rows = parse_request_csv(data, name, max_rows)
    except InvalidRequestCsv as exc:
        _record_invalid(store, request_id, name, exc)
        raise
    return store.create_request(
        Request(request_id=request_id, file_name=name),
        [
            RequestData(
                request_id=request_id,
                serial_number=r.serial_number,
                product_name=r.product_name,
                input_image_urls=r.input_image_urls,
                output_image_urls=[None] * len(r.input_image_urls),
                errors=[None] * len(r.input_image_urls),
            )
            for r in rows
        ],
    )


def submit_file(
    store: ProgressStore,
    path: Path,
    request_id: str | None = None,
    max_bytes: int = MAX_CSV_BYTES,
    max_rows: int = MAX_CSV_ROWS,
    roots: tuple[Path, ...] = (),
) -> Request:
    """`submit` for a CSV on disk; one that cannot be read safely (a link on its way from
    one of `roots`, the watched directories; not a regular file; over `max_bytes`) is an
    invalid request, recorded FAILED like any other."""
    request_id = request_id or new_request_id()
    try:
        data = read_request_csv(path, max_bytes, roots)
    except InvalidRequestCsv as exc:
        _record_invalid(store, request_id, path.name, exc)
        raise
    return submit(store, data, path.name, request_id, max_rows)


def image_key(options: ImageOptions, request_id: str, serial_number: int, n: int, ext: str) -> str:
    return join_key(options.prefix, IMAGE_OUTPUT_FOLDER, request_id, str(serial_number), f"{n}.{ext}")


def output_url(options: ImageOptions, key: str) -> str:
    if options.public_base_url:
        return f"{options.public_base_url.rstrip('/')}/{key}"
    return f"s3://{options.bucket}/{key}"


def _with_retries(fn: Callable[[], Any], options: ImageOptions) -> Any:
    """Transient fetch errors (a stalled read, a dropped connection, 5xx) are retried with
    doubling delays, at most `retries` times; each attempt has its own deadline, and a fetch
    that used up a whole deadline is not retried (`fetch._past_deadline`)."""
    delay = options.retry_delay_s
    for attempt in range(options.retries + 1):
        try:
            return fn()
        except FetchError as exc:
            if not is_transient(exc) or attempt == options.retries:
                raise
            time.sleep(delay)  # backoff between attempts, not a wait for a condition
            delay *= 2
    raise AssertionError("unreachable")


def process_row(
    store: ProgressStore, row: RequestData, client: Any, options: ImageOptions, staging: Path
) -> RequestData:
    """Fetch, compress, upload and verify each image of a row, recording each as it lands."""
    outputs: list[str | None] = list(row.output_image_urls) or [None] * len(row.input_image_urls)
    errors: list[str | None] = [None] * len(row.input_image_urls)
    for i, url in enumerate(row.input_image_urls):
        if outputs[i]:
            continue  # landed in an earlier attempt
        try:
            fetched = _with_retries(
                partial(
                    fetch_image,
                    url,
                    client,
                    options.max_bytes,
                    (options.fetch_timeout_s, options.fetch_timeout_s),
                    allow_private=options.allow_private_urls,
                    deadline_s=options.fetch_deadline_s,
                    s3_roots=(
                        options.s3_sources
                        if options.s3_sources is not None
                        else (f"{options.bucket}/{options.prefix}",),
                        options.s3_refused,
                    ),
                ),
                options,
            )
            image = compress(fetched.data, options.quality, options.output_format)
            key = image_key(options, row.request_id, row.serial_number, i + 1, image.extension)
            make_private_dir(staging, tighten_existing=True)
            with tempfile.NamedTemporaryFile(dir=staging, suffix=f".{image.extension}") as tmp:
                tmp.write(image.data)
                tmp.flush()
                uploaded = upload_file(
                    client,
                    options.bucket,
                    key,
                    Path(tmp.name),
                    content_type=image.content_type,
                    metadata={"x-completed": "true", "x-request-id": row.request_id},
                )
            verify_object(client, options.bucket, key, uploaded.size, uploaded.sha256)
            outputs[i] = output_url(options, key)
        except (ImageRequestError, ChecksumMismatch) as exc:
            errors[i] = str(exc)
        store.set_row_outputs(row.request_id, row.serial_number, outputs, errors, completed=i == len(outputs) - 1)
    return next(r for r in store.list_request_rows(row.request_id) if r.serial_number == row.serial_number)


def _write_output_csv(
    request_id: str, rows: list[RequestData], client: Any, options: ImageOptions, staging: Path
) -> str:
    """The output CSV beside the images; its URL."""
    products = [ProductRow(r.serial_number, r.product_name, r.input_image_urls) for r in rows]
    body = output_csv(products, {r.serial_number: r.output_image_urls for r in rows})
    key = join_key(options.prefix, IMAGE_OUTPUT_FOLDER, request_id, "output.csv")
    make_private_dir(staging, tighten_existing=True)
    with tempfile.NamedTemporaryFile(dir=staging, suffix=".csv") as tmp:
        tmp.write(body)
        tmp.flush()
        upload_file(
            client, options.bucket, key, Path(tmp.name), content_type="text/csv", metadata={"x-completed": "true"}
        )
    return output_url(options, key)


def _image_problems(rows: list[RequestData]) -> list[str]:
    return [f"row {r.serial_number} image {i + 1}: {e}" for r in rows for i, e in enumerate(r.errors) if e]


def finalize(store: ProgressStore, request_id: str, client: Any, options: ImageOptions, staging: Path) -> Request:
    """Write the output CSV beside the images and settle the request's status."""
    rows = store.list_request_rows(request_id)
    url = _write_output_csv(request_id, rows, client, options, staging)
    succeeded = any(u for r in rows for u in r.output_image_urls)
    status = RequestStatus.COMPLETED if succeeded else RequestStatus.FAILED
    return store.set_request_status(request_id, status, errors=_image_problems(rows), output_csv_url=url)


def give_up(
    store: ProgressStore, request_id: str, reason: str, client: Any, options: ImageOptions, staging: Path
) -> Request | None:
    """FAILED with `reason` first, when the run failed before `finalize` settled the request;
    None when it is settled already (finalize ran, or the CSV was refused) or was never
    recorded. The output CSV, with what did land, is written if S3 takes it: the failure may
    be S3's, and the request must not stay PROCESSING for want of its CSV."""
    request = store.get_request(request_id)
    if request is None or request.status in (RequestStatus.COMPLETED, RequestStatus.FAILED):
        return None
    rows = store.list_request_rows(request_id)
    problems = [reason, *_image_problems(rows)]
    url = None
    if rows:
        try:
            url = _write_output_csv(request_id, rows, client, options, staging)
        except Exception as exc:  # whatever failed, only the CSV is left out
            problems.append(f"output CSV not written: {type(exc).__name__}: {exc}")
    return store.set_request_status(request_id, RequestStatus.FAILED, errors=problems, output_csv_url=url)
