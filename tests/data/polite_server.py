"""A small real HTTP server standing in for one web host, bound to its own loopback address
(127.0.0.2, 127.0.0.3, ...: Linux routes all of 127/8 to lo), that records what a polite
client must not do: how many requests it had in flight at once, when each request came, and
which paths were asked for."""

from __future__ import annotations

import io
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

_JPEGS: dict[int, bytes] = {}


def jpeg(i: int) -> bytes:
    """A distinct small JPEG per index (noise, so sha256 and pHash differ between indexes)."""
    if i not in _JPEGS:
        rng = np.random.default_rng(i)
        img = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        _JPEGS[i] = buf.getvalue()
    return _JPEGS[i]


class Host:
    """One host on ``addr``: ``/img/<i>.jpg`` (after ``delay`` s, or ``status`` with
    ``Retry-After``; a 302 for a path in ``redirects``), ``/robots.txt`` (``robots``: a body, or an int status; None: 404; after
    ``robots_delay`` s)."""

    def __init__(self, addr: str, delay: float = 0.0, robots: str | int | None = None,
                 robots_delay: float = 0.0) -> None:
        self.addr, self.delay, self.robots, self.robots_delay = addr, delay, robots, robots_delay
        self.status = 200                 # image answer; e.g. 429 for a rate-limit storm
        self.redirects: dict[str, str] = {}   # path -> a 302 to this URL
        self.retry_after: str | None = None
        self.lock = threading.Lock()
        self.active = self.peak = 0
        self.log: list[tuple[float, str]] = []   # (monotonic arrival time, path)

    def paths(self, prefix: str = "") -> list[str]:
        with self.lock:
            return [p for _, p in self.log if p.startswith(prefix)]

    def times(self, prefix: str = "/img/") -> list[float]:
        with self.lock:
            return [t for t, p in self.log if p.startswith(prefix)]

    def url(self, path: str) -> str:
        return f"http://{self.addr}:{self.port}{path}"

    def __enter__(self) -> Host:
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with host.lock:
                    host.log.append((time.monotonic(), self.path))
                    host.active += 1
                    host.peak = max(host.peak, host.active)
                try:
                    self._answer()
                finally:
                    with host.lock:
                        host.active -= 1

            def _answer(self) -> None:
                if self.path == "/robots.txt":
                    time.sleep(host.robots_delay)
                    if isinstance(host.robots, str):
                        return self._send(200, host.robots.encode(), "text/plain")
                    return self._send(host.robots or 404, b"no\n", "text/plain")
                if self.path in host.redirects:
                    return self._send(302, b"", "text/plain", {"Location": host.redirects[self.path]})
                if host.delay:
                    time.sleep(host.delay)
                if host.status != 200:
                    extra = {"Retry-After": host.retry_after} if host.retry_after else {}
                    return self._send(host.status, b"busy\n", "text/plain", extra)
                idx = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                self._send(200, jpeg(idx), "image/jpeg")

            def _send(self, status: int, body: bytes, ctype: str, extra=None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def server_bind(self) -> None:   # no reverse-DNS lookup of the address
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

        self.server = Server((self.addr, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
