"""Optional completion webhook (IMAGE_WEBHOOK_URL): POST the request's final JSON."""

from __future__ import annotations

import time

import requests


def post_result(url: str, body: bytes, attempts: int = 3, delay_s: float = 0.5, timeout_s: float = 10.0) -> int:
    """POST with retries on connection errors and 5xx; returns the final status code."""
    status = 0
    for attempt in range(attempts):
        try:
            status = requests.post(
                url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout_s
            ).status_code
        except requests.RequestException:
            status = 0
        if 200 <= status < 500:
            return status
        if attempt < attempts - 1:
            time.sleep(delay_s * 2**attempt)  # backoff between attempts
    return status
