"""Optional completion webhook (IMAGE_WEBHOOK_URL): POST the request's final JSON."""

from __future__ import annotations

import time

import requests

from s3proc_dagster.errors import S3ProcError, is_transient


class WebhookRejected(S3ProcError):
    """The receiver answered with an error status; 429 and 5xx may pass on a later attempt."""

    def __init__(self, status: int) -> None:
        super().__init__(f"webhook answered HTTP {status}")
        self.status = status
        self.transient = status == 429 or status >= 500


def post_result(url: str, body: bytes, attempts: int = 3, delay_s: float = 0.5, timeout_s: float = 10.0) -> int:
    """POST, at most `attempts` times, while `errors.is_transient` says a retry may help;
    returns the final status code (0: no answer). The URL is the operator's setting, not the
    CSV's, so it is not vetted like an image URL."""
    status = 0
    for attempt in range(attempts):
        try:
            status = requests.post(
                url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout_s
            ).status_code
            if status < 400:
                return status
            raise WebhookRejected(status)
        except (requests.RequestException, WebhookRejected) as exc:
            if not isinstance(exc, WebhookRejected):
                status = 0
            if not is_transient(exc):
                return status
        if attempt < attempts - 1:
            time.sleep(delay_s * 2**attempt)  # backoff between attempts
    return status
