"""Fetch one input image: http(s) with bounds on time, size and redirects, or s3://.

Every bound exists because the URLs come from a user's spreadsheet: a slow host, a
redirect loop or a multi-gigabyte "image" must cost one row an error, not the run; and a
URL aimed at this machine or its network (loopback, cloud metadata, private ranges) is
refused at each hop by `egress.DestinationGuard` unless IMAGE_ALLOW_PRIVATE_URLS is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlparse

import requests
from requests.utils import requote_uri

from s3proc_dagster.errors import ImageRequestError
from s3proc_dagster.images.egress import DestinationGuard, DestinationRefused, GuardedAdapter

MAX_BYTES = 25 * 1024 * 1024
MAX_REDIRECTS = 3
TIMEOUT_S = (5.0, 15.0)  # connect, read
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


def _session(allow_private: bool, guard: DestinationGuard) -> requests.Session:
    session = requests.Session()
    if not allow_private:
        adapter = GuardedAdapter(guard)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session


def _get_following_redirects(session: requests.Session, url: str, timeout: tuple[float, float]) -> requests.Response:
    """GET `url`, following at most MAX_REDIRECTS redirects one request at a time.

    Not requests' own loop: here each hop is a fresh request whose connection the guard
    vets, only http(s) hops are followed, and a refusal names the hop that was refused.
    """
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response = session.get(current, stream=True, timeout=timeout, allow_redirects=False)
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


def _fetch_http(
    url: str, max_bytes: int, timeout: tuple[float, float], allow_private: bool, guard: DestinationGuard
) -> FetchedImage:
    session = _session(allow_private, guard)
    try:
        with _get_following_redirects(session, url, timeout) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise FetchError(f"{url}: HTTP {response.status_code}", transient=True)
            if response.status_code >= 400:
                raise FetchError(f"{url}: HTTP {response.status_code}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not content_type.startswith("image/"):
                raise FetchError(f"{url}: content type {content_type or 'missing'} is not an image")
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise FetchError(f"{url}: {declared} bytes is over the {max_bytes}-byte limit")
            body = bytearray()
            for block in response.iter_content(64 * 1024):
                body += block
                if len(body) > max_bytes:
                    raise FetchError(f"{url}: more than {max_bytes} bytes")
    except requests.Timeout:
        raise FetchError(f"{url}: timed out", transient=True) from None
    except requests.ConnectionError as exc:
        raise FetchError(f"{url}: connection failed ({type(exc).__name__})", transient=True) from None
    finally:
        session.close()
    data = bytes(body)
    _check_magic(url, data)
    return FetchedImage(url, data, content_type)


def _fetch_s3(url: str, client: Any, max_bytes: int) -> FetchedImage:
    parsed = urlparse(url)
    try:
        obj = client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
    except client.exceptions.NoSuchKey:
        raise FetchError(f"{url}: no such object") from None
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise FetchError(f"{url}: S3 error {code}", transient=code not in ("AccessDenied", "NoSuchBucket")) from None
    if obj["ContentLength"] > max_bytes:
        raise FetchError(f"{url}: {obj['ContentLength']} bytes is over the {max_bytes}-byte limit")
    data = obj["Body"].read()
    _check_magic(url, data)
    return FetchedImage(url, data, obj.get("ContentType", ""))


def fetch_image(
    url: str,
    s3_client: Any = None,
    max_bytes: int = MAX_BYTES,
    timeout: tuple[float, float] = TIMEOUT_S,
    allow_private: bool = False,
    guard: DestinationGuard = SYSTEM_GUARD,
) -> FetchedImage:
    """The image at `url`. An http(s) URL, and every redirect hop, must reach a public
    address unless `allow_private` (IMAGE_ALLOW_PRIVATE_URLS); `guard` is the resolver and
    connector that check it. s3:// goes through the configured client and is not checked:
    its endpoint is the operator's, not the CSV's."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return _fetch_http(url, max_bytes, timeout, allow_private, guard)
    if scheme == "s3":
        if s3_client is None:
            raise FetchError(f"{url}: no S3 client configured")
        return _fetch_s3(url, s3_client, max_bytes)
    raise FetchError(f"{url}: only http(s) and s3 URLs are supported")
