"""A pass-through HTTP proxy in front of SeaweedFS that can be told to fail, for real faults.

The pipeline talks to S3 through it exactly as to S3 (same signatures: the Host header is
forwarded untouched). A test arms a rule ("PUTs to keys containing part-00001 answer
503") to make one chunk's upload fail for real, then disarms it to let a re-execution
succeed; holds requests to a key ("stall") to catch a run at a chosen point and kill it
there; or takes S3 away altogether for a while ("outage"). Nothing is mocked: every
other request reaches the real server. The soak (soak.py) and the test suite (the
`deployment` fixture, test_two_nodes.py) both put it in front of SeaweedFS.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FaultyS3Proxy:
    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.fail_puts_containing: str | None = None
        # substring -> how many more PUTs of a matching key fail (then they pass): a fault that
        # lasts a number of requests, as boto3 retries each upload itself (its max_attempts)
        self.fail_puts_first: dict[str, int] = {}
        # what those counted failures answer: 409 OperationAborted is an S3 answer boto3 does
        # not retry by itself, so one failure is one failed upload call, whatever boto3's
        # retry budget left over from earlier faults (the product retries it: not permanent)
        self.counted_failure = (409, "OperationAborted")
        self.failed_requests = 0
        self.put_keys: list[str] = []
        self.stall_containing: str | None = None  # requests to such paths wait for `release`
        self.stall_method: str | None = None  # ... only requests of this method, when set
        self.stalled = threading.Event()  # set once a request is being held
        self.release = threading.Event()
        self.outage_until = 0.0  # time.monotonic() until which every request fails
        self.outage_after_puts: tuple[str, int, float] | None = None  # (path part, n PUTs, seconds)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the tests' and the soak's output clean
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlparse(self.path).path
                if self.command == "PUT":
                    proxy.put_keys.append(path)
                    trigger = proxy.outage_after_puts
                    if trigger and trigger[0] in path and sum(trigger[0] in k for k in proxy.put_keys) >= trigger[1]:
                        proxy.outage_after_puts = None
                        proxy.outage_until = time.monotonic() + trigger[2]
                if time.monotonic() < proxy.outage_until:
                    proxy.failed_requests += 1
                    self.close_connection = True  # S3 is gone: the connection drops without an answer
                    return
                stall = proxy.stall_containing and proxy.stall_containing in path
                if stall and proxy.stall_method in (None, self.command):
                    proxy.stalled.set()
                    proxy.release.wait(timeout=300)
                    self.close_connection = True  # a held request never reaches S3: its sender is gone
                    return
                rule = proxy.fail_puts_containing
                counted = next((k for k, n in proxy.fail_puts_first.items() if n > 0 and k in path), None)
                status, code = 503, "ServiceUnavailable"
                if counted and self.command == "PUT":
                    proxy.fail_puts_first[counted] -= 1
                    rule, (status, code) = counted, proxy.counted_failure
                if rule and self.command == "PUT" and rule in path:
                    proxy.failed_requests += 1
                    payload = f"<Error><Code>{code}</Code><Message>injected by test</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                conn.endheaders(body if body else None)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815 - http.server's names

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
