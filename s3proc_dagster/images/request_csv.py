"""The product CSV of an image request: `S. No.,Product Name,Input Image Urls`, validated before any work.

Validation collects every problem, by row, before a single image is fetched: a user fixes
a 500-row file once, not once per error. Whoever drops the CSV is untrusted, so it is read
within caps on its size and its rows, and never through a symlink: below the watched
directory not through a linked folder either (`sources.confined`), or a producer's link
would have the service read, and publish, another team's product CSV.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from s3proc_dagster.errors import ImageRequestError, UnsafeSourceError, UnsupportedFileError
from s3proc_dagster.sources.confined import open_fd, open_regular

EXPECTED = ("s. no.", "product name", "input image urls")
OUTPUT_COLUMN = "Output Image Urls"
_SPACES = re.compile(r"\s+")
MAX_SNIFF_BYTES = 4096
# The defaults of IMAGE_CSV_MAX_BYTES and IMAGE_CSV_MAX_ROWS (settings.py gives the reasons).
MAX_CSV_BYTES = 16 * 2**20
MAX_CSV_ROWS = 10_000


@dataclass(frozen=True)
class ProductRow:
    serial_number: int
    product_name: str
    input_image_urls: list[str]


class InvalidRequestCsv(ImageRequestError):
    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{name}: {len(problems)} problem(s): " + "; ".join(problems))


def _norm(header: str) -> str:
    return _SPACES.sub(" ", header.strip().lower())


def looks_like_request_csv(path: Path, roots: tuple[Path, ...] = ()) -> bool:
    """Routing by header, not by name: the first line names the three columns of a product CSV."""
    try:  # never through a link, never blocking on a FIFO swapped in after the sensor looked
        with open_regular(path, roots) as f:
            first = f.readline(MAX_SNIFF_BYTES).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, UnsupportedFileError):
        return False
    try:
        header = next(csv.reader([first]))
    except (csv.Error, StopIteration):
        return False
    return tuple(_norm(h) for h in header) == EXPECTED


def read_request_csv(path: Path, max_bytes: int = MAX_CSV_BYTES, roots: tuple[Path, ...] = ()) -> bytes:
    """The CSV's bytes, or InvalidRequestCsv saying why it was refused.

    Opened as `sources.confined` opens a producer's file: below one of `roots` (the watched
    directories) by walking from the root without following a link, so a folder swapped for
    a link between the sensor's look and the run leads nowhere; elsewhere (`s3proc images
    submit` of the operator's own file) as named, its last component never a link. Either
    way O_NONBLOCK keeps a FIFO from blocking, and what fstat checked is what is read.
    """
    name = path.name
    try:
        fd = open_fd(path, roots)
    except UnsafeSourceError as exc:  # a link, a FIFO or device, a second hard link
        raise InvalidRequestCsv(name, [str(exc)]) from None
    except OSError as exc:
        raise InvalidRequestCsv(name, [f"file cannot be opened: {exc.strerror or exc}"]) from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise InvalidRequestCsv(name, [_too_big(size, max_bytes)])
        data = f.read(max_bytes + 1)  # the file may grow after fstat
    if len(data) > max_bytes:
        raise InvalidRequestCsv(name, [_too_big(len(data), max_bytes)])
    return data


def _too_big(size: int, max_bytes: int) -> str:
    return f"file is {size} bytes, over the {max_bytes}-byte limit (IMAGE_CSV_MAX_BYTES)"


def _valid_url(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return bool(parsed.netloc)
    return parsed.scheme == "s3" and bool(parsed.netloc) and bool(parsed.path.strip("/"))


def _records(text: str, name: str) -> Iterator[list[str]]:
    """csv's records; a field over csv's size limit or a NUL byte is the request's problem,
    not an exception out of validation."""
    reader = csv.reader(io.StringIO(text))
    try:
        yield from reader
    except csv.Error as exc:
        raise InvalidRequestCsv(name, [f"line {reader.line_num}: not readable as CSV ({exc})"]) from None


def _column_indexes(header: list[str], name: str) -> list[int]:
    """Where the three columns are, in EXPECTED's order; InvalidRequestCsv when any is missing or extra."""
    problems: list[str] = []
    normalized = [_norm(h) for h in header]
    missing = [e for e in EXPECTED if e not in normalized]
    extra = [h for h, n in zip(header, normalized, strict=True) if n not in EXPECTED]
    if missing:
        problems.append(f"header: missing column(s) {', '.join(repr(m) for m in missing)}")
    if extra:
        problems.append(f"header: unexpected column(s) {', '.join(repr(x) for x in extra)}")
    if problems:
        raise InvalidRequestCsv(name, problems)
    return [normalized.index(e) for e in EXPECTED]


def parse_request_csv(data: bytes, name: str = "request.csv", max_rows: int = MAX_CSV_ROWS) -> list[ProductRow]:
    """Rows in file order, or InvalidRequestCsv listing every problem by row. Past
    `max_rows` rows it stops reading: the request is refused whatever the rest holds."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequestCsv(name, ["file is not UTF-8 text"]) from None
    if not text.strip():
        raise InvalidRequestCsv(name, ["file is empty"])
    reader = _records(text, name)
    header = next(reader)
    idx = _column_indexes(header, name)
    problems: list[str] = []
    rows: list[ProductRow] = []
    seen: dict[int, int] = {}
    counted = 0
    for line_no, record in enumerate(reader, start=2):
        if not any(cell.strip() for cell in record):
            continue
        counted += 1
        if counted > max_rows:
            raise InvalidRequestCsv(name, [f"more than {max_rows} rows (IMAGE_CSV_MAX_ROWS)"])
        if len(record) != len(header):
            problems.append(f"row {line_no}: expected {len(header)} fields, found {len(record)}")
            continue
        serial_raw, product, urls_raw = (record[i].strip() for i in idx)
        try:
            serial = int(serial_raw)
        except ValueError:
            problems.append(f"row {line_no}: S. No. {serial_raw!r} is not a whole number")
            serial = None
        if serial is not None:
            if serial in seen:
                problems.append(f"row {line_no}: duplicate S. No. {serial} (first on row {seen[serial]})")
            seen.setdefault(serial, line_no)
        if not product:
            problems.append(f"row {line_no}: empty Product Name")
        urls = [u.strip() for u in urls_raw.split(",") if u.strip()]
        if not urls:
            problems.append(f"row {line_no}: no Input Image Urls")
        for url in urls:
            if not _valid_url(url):
                problems.append(f"row {line_no}: {url!r} is not an http(s) or s3 URL")
        if serial is not None:
            rows.append(ProductRow(serial, product, urls))
    if not rows and not problems:
        problems.append("file has a header but no rows")
    if problems:
        raise InvalidRequestCsv(name, problems)
    return rows


def output_csv(rows: list[ProductRow], outputs: dict[int, list[str | None]]) -> bytes:
    """The input columns plus `Output Image Urls`, rows and URLs in input order."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls", OUTPUT_COLUMN])
    for row in rows:
        got = outputs.get(row.serial_number, [])
        writer.writerow(
            [row.serial_number, row.product_name, ",".join(row.input_image_urls), ",".join(u or "" for u in got)]
        )
    return out.getvalue().encode()
