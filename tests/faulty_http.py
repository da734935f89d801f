"""A loopback HTTP file server with Range support that can misbehave on purpose."""

from __future__ import annotations

import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


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
    ) -> None:
        self.root, self.drop_rate, self.error_rate, self.drops_left = root, drop_rate, error_rate, max_drops
        self.rate = rate  # bytes per second, to make a download slow enough to kill mid-way
        self.rng = random.Random(seed)
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = server.root / self.path.lstrip("/")
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
                    start = int(rng_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        server.requests.append((self.path, rng_header, 416))
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                status = 206 if rng_header else 200
                server.requests.append((self.path, rng_header, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if rng_header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
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
