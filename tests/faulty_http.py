"""A loopback HTTP file server with Range support that can misbehave on purpose, and that can
ask for credentials as real servers do (basic auth, or a presigned URL's query parameters)."""

from __future__ import annotations

import base64
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote


class FaultyServer:
    """Serves files from `root` on 127.0.0.1; `drop_rate` of bodies are cut short and
    `error_rate` of requests answer 503, decided by a seeded RNG so runs are repeatable;
    `max_drops` caps the number of cut bodies so a test knows the download can finish."""

    def __init__(
        self,
        root: Path,
        drop_rate: float = 0.0,
        error_rate: float = 0.0,
        seed: int = 0,
        max_drops: int | None = None,
        rate: int | None = None,
        auth: tuple[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> None:
        self.root, self.drop_rate, self.error_rate, self.drops_left = root, drop_rate, error_rate, max_drops
        self.rate = rate  # bytes per second, to make a download slow enough to kill mid-way
        # auth: the (user, password) every request must bring in its Authorization header;
        # query: parameters every request's query must hold (a presigned URL's signature)
        self.auth, self.query = auth, query or {}
        self.refused = 0  # requests answered 401 or 403 for want of credentials
        self.rng = random.Random(seed)
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def refuse(self) -> bool:
                """Answer 401/403 when the request lacks the credentials asked for."""
                _, _, query = self.path.partition("?")
                status = 0
                if server.auth is not None:
                    token = base64.b64encode(":".join(server.auth).encode()).decode()
                    if self.headers.get("Authorization") != f"Basic {token}":
                        status = 401
                if not status and not set(server.query.items()) <= set(parse_qsl(query)):
                    status = 403
                if not status:
                    return False
                with server.lock:
                    server.refused += 1
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def do_HEAD(self) -> None:
                if self.refuse():
                    return
                path = server.root / unquote(self.path.partition("?")[0]).lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:
                if self.refuse():
                    return
                path = server.root / unquote(self.path.partition("?")[0]).lstrip("/")
                rng_header = self.headers.get("Range")
                with server.lock:
                    fail = server.rng.random() < server.error_rate
                    drop = server.rng.random() < server.drop_rate and server.drops_left != 0
                    if drop and server.drops_left is not None:
                        server.drops_left -= 1
                if fail:
                    server.requests.append((self.path, rng_header, 503))
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not path.is_file():
                    server.requests.append((self.path, rng_header, 404))
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if rng_header:
                    first, _, last = rng_header.removeprefix("bytes=").partition("-")
                    start = int(first)
                    if start >= len(data):
                        server.requests.append((self.path, rng_header, 416))
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start : int(last) + 1] if rng_header and last else data[start:]
                status = 206 if rng_header else 200
                server.requests.append((self.path, rng_header, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if rng_header:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
                self.end_headers()
                if drop and len(body) > 1:
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if server.rate:
                    step = max(1, server.rate // 20)
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i : i + step])
                        time.sleep(0.05)
                    return
                self.wfile.write(body)

        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
