"""A loopback reverse proxy in front of a real S3 endpoint that fails for a while, then recovers.

The first `failures` requests get an S3-style error (alternating 500 InternalError and 503
SlowDown, S3's throttling answer); every later request is forwarded unchanged. Optionally,
`latency` seconds are added to every request (a bucket in the same region is about 0.025),
`deny` maps a path suffix to the status (403, 404) its requests always get, and `log` records
(method, path, response bytes) of every forwarded request (`statuses`: their status codes).

`bandwidth` (bytes/s, 0: none) caps what all responses together send, as one wire would: each
64 KiB of a body takes the next free slot of 64 KiB / bandwidth seconds on one shared timeline,
so concurrent downloads share the wire and together never exceed it. `before_forward(method,
path)` runs before each request is forwarded (a test replaces an object mid-download there).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

CHUNK = 64 << 10
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class FaultyS3Proxy:
    def __init__(
        self,
        upstream: str,
        failures: int = 0,
        latency: float = 0.0,
        deny: dict[str, int] | None = None,
        bandwidth: float = 0.0,
        before_forward: Callable[[str, str], None] | None = None,
    ) -> None:
        self.upstream, self.failures_left = upstream.rstrip("/"), failures
        self.latency, self.deny, self.bandwidth, self.before_forward = latency, deny or {}, bandwidth, before_forward
        self.lock = threading.Lock()
        self.errors_sent: list[int] = []
        self.log: list[tuple[str, str, int]] = []
        self.statuses: list[int] = []
        self._wire_free = 0.0  # when the shared wire is next free (time.monotonic())
        self._closing = threading.Event()
        proxy = self
        session = requests.Session()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.latency:
                    proxy._closing.wait(proxy.latency)
                denied = next((c for suffix, c in proxy.deny.items() if self.path.split("?")[0].endswith(suffix)), None)
                with proxy.lock:
                    fail = proxy.failures_left > 0 or denied is not None
                    if denied is not None:
                        status = denied
                    elif fail:
                        proxy.failures_left -= 1
                        status = 503 if len(proxy.errors_sent) % 2 else 500
                    if fail:
                        proxy.errors_sent.append(status)
                if fail:
                    code = {503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}.get(status, "InternalError")
                    msg = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                if proxy.before_forward is not None:
                    proxy.before_forward(self.command, self.path.split("?")[0])
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
                r = session.request(
                    self.command,
                    proxy.upstream + self.path,
                    headers=headers,
                    data=body,
                    stream=True,
                    allow_redirects=False,
                )
                data = r.raw.read(decode_content=False)
                with proxy.lock:
                    proxy.log.append((self.command, self.path.split("?")[0], len(data)))
                    proxy.statuses.append(r.status_code)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header(
                    "Content-Length", str(len(data) if self.command != "HEAD" else r.headers.get("Content-Length", 0))
                )
                self.end_headers()
                if self.command != "HEAD":
                    for k in range(0, len(data), CHUNK):
                        proxy._pace(len(data[k : k + CHUNK]))
                        self.wfile.write(data[k : k + CHUNK])

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _pace(self, n: int) -> None:
        """Wait for this many bytes' slot on the shared wire (no wait without a bandwidth cap)."""
        if not self.bandwidth:
            return
        with self.lock:
            start = max(time.monotonic(), self._wire_free)
            self._wire_free = start + n / self.bandwidth
            end = self._wire_free
        self._closing.wait(max(0.0, end - time.monotonic()))

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
