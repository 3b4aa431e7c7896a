"""``NoisyWeb``: a real threaded HTTP server on 127.0.0.1 serving the synthetic noisy web.

Routes
  ``GET /img/<id>.jpg[?w=&h=&q=]``  the sample's JPEG; ``w``/``h``/``q`` resize and re-encode it
                                    (near-duplicates, thumbnails, banners); other params are ignored
  ``GET /fault/<name>/<id>``        a transport or decoding fault from ``faults.FAULTS``
  ``GET /healthz``                  ``ok``

The demo, the tests and the benchmarks of the download stage point a real HTTP client at it, so
it speaks HTTP/1.1 with keep-alive, is deterministic from its seed, caches encoded images, and
stops promptly even while fault handlers are dripping bytes into open connections.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from align_ray.web.faults import FAULT_NAMES, FAULTS, FaultContext
from align_ray.web.noise import plan_pairs
from align_ray.web.store import DEFAULT_QUALITY, ImageStore
from align_ray.web.synth import derive_seed

MAX_SIDE = 4096
URL_LIST_COLUMNS = ("url", "caption", "noise", "fault")


def image_params(query: dict[str, str]) -> tuple[int | None, int | None, int] | None:
    """``(w, h, q)`` of an image request, or None when one is malformed or out of range."""
    try:
        width, height = (int(query[k]) if k in query else None for k in ("w", "h"))
        quality = int(query.get("q", DEFAULT_QUALITY))
    except ValueError:
        return None
    sides_ok = all(1 <= side <= MAX_SIDE for side in (width, height) if side is not None)
    return (width, height, quality) if sides_ok and 1 <= quality <= 100 else None


class _Server(ThreadingHTTPServer):
    """Threaded server that knows its open connections, so ``stop`` can cut them."""

    daemon_threads = True
    block_on_close = False  # stop() shuts the sockets instead of waiting for handlers
    request_queue_size = 1024  # Python's default of 5 drops handshakes under 64+ clients

    def __init__(self, address: tuple[str, int], store: ImageStore) -> None:
        self.store = store
        self.stop_event = threading.Event()
        self._connections: set[socket.socket] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host (no traffic off 127.0.0.1)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def track(self, conn: socket.socket, open_: bool) -> None:
        """Register (``open_``) or forget a client connection."""
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def cut_connections(self) -> None:
        """Shut every open client socket so blocked handler threads fail fast and exit."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def first_request(self, key: str) -> bool:
        """True the first time ``key`` is seen by this server (for the ``*once`` faults)."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that hang up; report real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes ``/img``, ``/fault`` and ``/healthz``; HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are closed after this
    server: _Server
    _IMG = re.compile(r"/img/(\d+)\.jpg")
    _FAULT = re.compile(r"/fault/([^/]+)/(\d+)")

    def setup(self) -> None:
        """Register the connection so NoisyWeb.stop can cut it."""
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        """Forget the connection, even when flushing to a vanished client fails."""
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the per-request access log."""

    def do_GET(self) -> None:
        """Dispatch on the path; unknown paths and fault names are 404."""
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        if img := self._IMG.fullmatch(url.path):
            self._image(int(img.group(1)), query)
        elif (fault := self._FAULT.fullmatch(url.path)) and fault.group(1) in FAULTS:
            self._fault(fault.group(1), int(fault.group(2)), query)
        elif url.path == "/healthz":
            self._reply(200, b"ok\n", "text/plain")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        """A complete response with Content-Length (keeps the connection reusable)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _image(self, idx: int, query: dict[str, str]) -> None:
        """The sample's JPEG, optionally resized (``w``, ``h``) and re-encoded (``q``)."""
        params = image_params(query)
        if params is None:
            self._reply(400, b"bad w, h or q\n", "text/plain")
        else:
            self._reply(200, self.server.store.jpeg(idx, *params), "image/jpeg")

    def _fault(self, name: str, fault_id: int, query: dict[str, str]) -> None:
        """Hand the request to the fault handler; its valid image is sample ``fault_id``'s."""
        store = self.server.store
        FAULTS[name](FaultContext(
            http=self, name=name, fault_id=fault_id, query=query,
            jpeg=lambda: store.jpeg(fault_id), stop=self.server.stop_event,
            first_request=self.server.first_request,
        ))


class NoisyWeb:
    """The noisy synthetic web on a local port; use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, seed: int = 0, photo_like: bool = False,
                 image_size_range: tuple[int, int] = (128, 512), pool_size: int | None = None) -> None:
        self.host, self.port, self.seed = host, port, seed
        self.store = ImageStore(seed, photo_like, image_size_range, pool_size)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._server is None:
            raise RuntimeError("NoisyWeb is not started")
        return f"http://{self.host}:{self._server.server_port}"

    def start(self) -> NoisyWeb:
        """Pre-render the pool (if any), bind, and serve on a daemon thread."""
        self.store.warm_pool()
        self._server = _Server((self.host, self.port), self.store)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="noisy-web", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving within a fraction of a second, cutting slow connections still open."""
        if self._server is None:
            return
        self._server.stop_event.set()
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._server = self._thread = None

    def __enter__(self) -> NoisyWeb:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url_rows(self, n: int, *, noise: bool = True, faults: bool = False,
                 fault_fraction: float = 0.1) -> list[dict[str, Any]]:
        """``n`` rows ``{url, caption, noise, fault}``, deterministic given the seed.

        With ``faults`` about ``fault_fraction`` of the rows are ``/fault/<name>/<row>`` URLs
        (``noise="fault"``), every fault name at least once when ``n`` allows it.
        """
        fault_at = fault_slots(n, fault_fraction, self.seed) if faults else {}
        image_ids = [i for i in range(n) if i not in fault_at]
        pairs = iter(plan_pairs(image_ids, self.seed, spec=self.store.spec, size=self.store.size, noise=noise))
        rows = []
        for i in range(n):
            if i in fault_at:
                path, caption, kind = f"/fault/{fault_at[i]}/{i}", self.store.spec(i)["caption"], "fault"
            else:
                pair = next(pairs)
                path, caption, kind = pair.path, pair.caption, pair.noise
            rows.append({"url": self.base_url + path, "caption": caption, "noise": kind, "fault": fault_at.get(i)})
        return rows

    @staticmethod
    def write_url_list(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
        """Write ``rows`` as .parquet, .csv, .tsv or .jsonl (by extension); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        suffix = out.suffix.lower()
        if suffix == ".jsonl":
            out.write_text("".join(json.dumps({c: r[c] for c in URL_LIST_COLUMNS}, ensure_ascii=False) + "\n"
                                   for r in rows), encoding="utf-8")
            return out
        schema = pa.schema([(c, pa.string()) for c in URL_LIST_COLUMNS])
        table = pa.Table.from_pylist([{c: r[c] for c in URL_LIST_COLUMNS} for r in rows], schema=schema)
        if suffix == ".parquet":
            pq.write_table(table, out)
        elif suffix in (".csv", ".tsv"):
            pa_csv.write_csv(table, out, pa_csv.WriteOptions(delimiter="," if suffix == ".csv" else "\t"))
        else:
            raise ValueError(f"unsupported URL-list extension {suffix!r} (use .parquet, .csv, .tsv or .jsonl)")
        return out


def fault_slots(n: int, fault_fraction: float, seed: int) -> dict[int, str]:
    """Row index -> fault name: ``round(n * fault_fraction)`` rows, at least one per fault name."""
    count = min(n, max(len(FAULT_NAMES), round(n * fault_fraction)))
    rng = random.Random(derive_seed("faults", seed, n))
    names = [*FAULT_NAMES, *(rng.choice(FAULT_NAMES) for _ in range(count - len(FAULT_NAMES)))][:count]
    rng.shuffle(names)
    return dict(zip(sorted(rng.sample(range(n), count)), names))


def _parser() -> argparse.ArgumentParser:
    """Options of ``align-ray demo-web``."""
    parser = argparse.ArgumentParser(
        prog="align-ray demo-web",
        description="Serve synthetic image/alt-text pairs with ALIGN-style noise and faults on a local port, "
        "and write their URL list.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--rows", type=int, default=2000, help="URL-list rows to write")
    parser.add_argument("--output", default="urls.parquet", help=".parquet, .csv, .tsv or .jsonl")
    parser.add_argument("--faults", action="store_true", help="mix in every transport/decoding fault")
    parser.add_argument("--noise", action=argparse.BooleanOptionalAction, default=True,
                        help="ALIGN-style alt-text and image noise")
    parser.add_argument("--photo-like", action="store_true", help="textured JPEGs (~100-200 KB at 640-1024 px)")
    parser.add_argument("--image-size-range", type=int, nargs=2, default=(128, 512), metavar=("MIN", "MAX"),
                        help="native image sides are drawn uniformly from this range")
    parser.add_argument("--pool-size", type=int, default=None, help="serve only this many distinct images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``align-ray demo-web``: serve the noisy web and write its URL list until SIGINT/SIGTERM."""
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    web = NoisyWeb(args.host, args.port, args.seed, args.photo_like, tuple(args.image_size_range), args.pool_size)
    with web:
        rows = web.url_rows(args.rows, noise=args.noise, faults=args.faults)
        path = web.write_url_list(args.output, rows)
        print(f"serving {web.base_url}\nwrote {len(rows)} URLs to {path}\nCtrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    return 0
