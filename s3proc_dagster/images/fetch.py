"""Fetch one input image: http(s) with bounds on time, size and redirects, or s3://.

Every bound exists because the URLs come from a user's spreadsheet: a slow host, a
redirect loop or a multi-gigabyte "image" must cost one image an error, not the row or the
run; a host that drips bytes meets the overall deadline (`deadline.py`); and a
URL aimed at this machine or its network (loopback, cloud metadata, private ranges) is
refused at each hop by `egress.DestinationGuard` unless IMAGE_ALLOW_PRIVATE_URLS is set.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlparse

import requests
from requests.utils import requote_uri

from s3proc_dagster.errors import ImageRequestError, UnsafeSourceError, is_transient, s3_error_code
from s3proc_dagster.images.deadline import Deadline
from s3proc_dagster.images.egress import DestinationGuard, DestinationRefused, GuardedAdapter
from s3proc_dagster.sources.names import check_canonical

MAX_BYTES = 25 * 1024 * 1024
MAX_REDIRECTS = 3
TIMEOUT_S = (5.0, 15.0)  # connect, read: each one, not the whole fetch
DEADLINE_S = 60.0  # the whole fetch (IMAGE_FETCH_DEADLINE_MS)
SYSTEM_GUARD = DestinationGuard()  # the machine's resolver, real sockets
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"GIF8")


class FetchError(ImageRequestError):
    """The image could not be fetched; `transient` says whether a retry may help."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class FetchedImage:
    url: str
    data: bytes
    content_type: str


def _check_magic(url: str, data: bytes) -> None:
    if not any(data.startswith(m) for m in _IMAGE_MAGIC) or (data.startswith(b"RIFF") and data[8:12] != b"WEBP"):
        raise FetchError(f"{url}: body is not a JPEG, PNG, WebP or GIF image")


def _session(allow_private: bool, guard: DestinationGuard, deadline: Deadline) -> requests.Session:
    """Every connection through the guard: it vets the destination (unless private ones are
    allowed) and is where the deadline learns of each socket."""
    guard = replace(guard, connect=deadline.connector(guard.connect), refuse_private=not allow_private)
    session = requests.Session()
    adapter = GuardedAdapter(guard)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _past_deadline(url: str, deadline: Deadline) -> FetchError:
    """Permanent: the deadline is already the whole fetch's generous budget, and a host that
    cannot answer within it (or drips bytes to hold the row) would, on a retry, hold the row
    for another full budget each time; a stalled read (`timed out`) is the transient case."""
    return FetchError(f"{url}: no complete response within {deadline.seconds:.1f} s (overall deadline)")


def _get_following_redirects(
    session: requests.Session, url: str, timeout: tuple[float, float], deadline: Deadline
) -> requests.Response:
    """GET `url`, following at most MAX_REDIRECTS redirects one request at a time.

    Not requests' own loop: here each hop is a fresh request whose connection the guard
    vets, only http(s) hops are followed, a refusal names the hop that was refused, and each
    hop gets only what is left of the deadline.
    """
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        if deadline.expired:
            raise _past_deadline(url, deadline)
        try:
            response = session.get(current, stream=True, timeout=deadline.bound(timeout), allow_redirects=False)
        except DestinationRefused as exc:
            hop = "" if current == url else f"redirect to {current}: "
            raise FetchError(f"{url}: refused: {hop}{exc}") from None
        location = session.get_redirect_target(response)
        if location is None:
            return response
        response.close()
        current = urljoin(current, requote_uri(location))
        if urlparse(current).scheme not in ("http", "https"):
            raise FetchError(f"{url}: redirect to {current}: only http(s) redirects are followed")
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _declared_length(url: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()):
        raise FetchError(f"{url}: Content-Length {raw!r} is not a byte count")
    return int(text)


def _read_body(url: str, response: requests.Response, max_bytes: int, deadline: Deadline) -> bytes:
    body = bytearray()
    try:
        for block in response.iter_content(64 * 1024):
            body += block
            if len(body) > max_bytes:
                raise FetchError(f"{url}: more than {max_bytes} bytes")
            if deadline.expired:
                raise _past_deadline(url, deadline)
    except requests.exceptions.ContentDecodingError:
        encoding = response.headers.get("Content-Encoding", "")
        raise FetchError(f"{url}: body does not decode as its Content-Encoding {encoding!r} says") from None
    if deadline.cut:  # read to a close the deadline caused: the body may be cut short
        raise _past_deadline(url, deadline)
    return bytes(body)


def _fetch_http(
    url: str,
    max_bytes: int,
    timeout: tuple[float, float],
    allow_private: bool,
    guard: DestinationGuard,
    deadline_s: float,
) -> FetchedImage:
    deadline = Deadline(deadline_s)
    session = _session(allow_private, guard, deadline)
    try:
        with deadline, _get_following_redirects(session, url, timeout, deadline) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise FetchError(f"{url}: HTTP {response.status_code}", transient=True)
            if response.status_code >= 400:
                raise FetchError(f"{url}: HTTP {response.status_code}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not content_type.startswith("image/"):
                raise FetchError(f"{url}: content type {content_type or 'missing'} is not an image")
            declared = _declared_length(url, response.headers.get("Content-Length"))
            if declared is not None and declared > max_bytes:
                raise FetchError(f"{url}: {declared} bytes is over the {max_bytes}-byte limit")
            data = _read_body(url, response, max_bytes, deadline)
    except FetchError:
        raise
    except Exception as exc:  # whatever the transport raises is this image's error, never the row's
        raise _transport_error(url, exc, deadline) from None
    finally:
        session.close()
    _check_magic(url, data)
    return FetchedImage(url, data, content_type)


def _transport_error(url: str, exc: Exception, deadline: Deadline) -> FetchError:
    if deadline.expired:  # the deadline's own cut surfaces as a closed connection or a timeout
        return _past_deadline(url, deadline)
    if isinstance(exc, requests.Timeout):
        return FetchError(f"{url}: timed out", transient=True)
    if isinstance(exc, requests.ConnectionError):
        return FetchError(f"{url}: connection failed ({type(exc).__name__})", transient=True)
    return FetchError(f"{url}: {type(exc).__name__}: {exc}", transient=is_transient(exc))


def _below(place: str, root: str) -> bool:
    root = root.strip("/")
    return place == root or place.startswith(root + "/")


def _check_s3_root(url: str, allowed: tuple[str, ...], refused: tuple[str, ...]) -> None:
    parsed = urlparse(url)
    # SeaweedFS reads `a//b` as `a/b` and `\` as `/`: `<prefix>//_s3proc/x` or `<prefix>/\_s3proc/x`
    # would pass for a key outside the refused step outputs and then be read from inside them
    try:
        check_canonical(parsed.path.removeprefix("/"), "key")
    except UnsafeSourceError as exc:
        raise FetchError(f"{url}: refused: not one canonical key: {exc}") from None
    place = f"{parsed.netloc}/{parsed.path.lstrip('/')}"
    if any(_below(place, root) for root in refused) or not any(_below(place, root) for root in allowed):
        shown = ", ".join(f"s3://{root.strip('/')}/" for root in allowed) or "none"
        raise FetchError(f"{url}: refused: s3:// images are read only below {shown} (IMAGE_S3_SOURCES)")


def _fetch_s3(url: str, client: Any, max_bytes: int) -> FetchedImage:
    parsed = urlparse(url)
    try:
        obj = client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
    except client.exceptions.NoSuchKey:
        raise FetchError(f"{url}: no such object") from None
    except Exception as exc:
        code = s3_error_code(exc) or type(exc).__name__
        raise FetchError(f"{url}: S3 error {code}", transient=is_transient(exc)) from None
    if obj["ContentLength"] > max_bytes:
        obj["Body"].close()
        raise FetchError(f"{url}: {obj['ContentLength']} bytes is over the {max_bytes}-byte limit")
    try:
        data = obj["Body"].read(max_bytes + 1)
    except Exception as exc:
        raise FetchError(f"{url}: reading from S3 failed ({type(exc).__name__})", transient=is_transient(exc)) from None
    if len(data) > max_bytes:
        raise FetchError(f"{url}: more than {max_bytes} bytes")
    _check_magic(url, data)
    return FetchedImage(url, data, obj.get("ContentType", ""))


def fetch_image(
    url: str,
    s3_client: Any = None,
    max_bytes: int = MAX_BYTES,
    timeout: tuple[float, float] = TIMEOUT_S,
    allow_private: bool = False,
    guard: DestinationGuard = SYSTEM_GUARD,
    deadline_s: float = DEADLINE_S,
    s3_roots: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
) -> FetchedImage:
    """The image at `url`, or FetchError: nothing else escapes, so one bad URL costs its
    image, not the row. An http(s) URL, and every redirect hop, must reach a public address
    unless `allow_private` (IMAGE_ALLOW_PRIVATE_URLS); `guard` is the resolver and connector
    that check it. `timeout` bounds each connect and each read, `deadline_s` the whole fetch
    (every hop, headers and body). s3:// goes through the configured client, and only
    below the allowed `bucket/prefix` roots and none of the refused ones (`s3_roots`): the
    service may read buckets the CSV's author must not copy out through it."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return _fetch_http(url, max_bytes, timeout, allow_private, guard, deadline_s)
    if scheme == "s3":
        if s3_client is None:
            raise FetchError(f"{url}: no S3 client configured")
        if s3_roots is not None:
            _check_s3_root(url, *s3_roots)
        return _fetch_s3(url, s3_client, max_bytes)
    raise FetchError(f"{url}: only http(s) and s3 URLs are supported")
