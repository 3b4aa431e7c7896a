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
import io
import json
import os
import random
import re
import signal
import socket
import socketserver
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from PIL import Image

from align_ray.web.faults import FAULT_NAMES, FAULTS, FaultContext
from align_ray.web.noise import plan_pairs
from align_ray.web.synth import derive_seed, image_size, jpeg_bytes, render, sample_spec

MAX_SIDE = 4096
DEFAULT_QUALITY = 90
URL_LIST_COLUMNS = ("url", "caption", "noise", "fault")


class ImageStore:
    """Encoded JPEGs per sample id: a pinned pool (``pool_size``) or a byte-bounded LRU cache."""

    def __init__(self, seed: int, photo_like: bool, size_range: tuple[int, int],
                 pool_size: int | None, cache_bytes: int = 256 << 20) -> None:
        self.seed, self.photo_like, self.size_range, self.pool_size = seed, photo_like, size_range, pool_size
        self._cache: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        self._pool: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def key(self, idx: int) -> int:
        """The sample whose picture ``idx`` shows (``idx % pool_size`` with a pool)."""
        return idx % self.pool_size if self.pool_size else idx

    def spec(self, idx: int) -> dict[str, Any]:
        """Attributes and caption of the picture served for ``idx``."""
        return sample_spec(self.key(idx), self.seed)

    def size(self, idx: int) -> tuple[int, int]:
        """Native ``(width, height)`` of the picture served for ``idx``."""
        return image_size(self.key(idx), self.seed, self.size_range)

    def warm_pool(self) -> None:
        """Render and pin the whole pool up front (threaded: PIL releases the GIL while encoding)."""
        if not self.pool_size:
            return
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as executor:
            self._pool = dict(zip(range(self.pool_size), executor.map(self._render, range(self.pool_size))))

    def jpeg(self, idx: int, width: int | None = None, height: int | None = None,
             quality: int = DEFAULT_QUALITY) -> bytes:
        """The JPEG for ``idx``; a requested size or quality re-encodes the native picture."""
        key = self.key(idx)
        native_w, native_h = self.size(idx)
        if width and not height:
            height = max(1, round(native_h * width / native_w))
        elif height and not width:
            width = max(1, round(native_w * height / native_h))
        width, height = width or native_w, height or native_h
        if (width, height, quality) == (native_w, native_h, DEFAULT_QUALITY):
            return self._native(key)
        cache_key = (key, width, height, quality)
        cached = self._cached(cache_key)
        if cached is None:
            picture = Image.open(io.BytesIO(self._native(key)))
            cached = jpeg_bytes(picture.resize((width, height), Image.Resampling.LANCZOS), quality)
            self._remember(cache_key, cached)
        return cached

    def _native(self, key: int) -> bytes:
        """The picture of sample ``key`` at its native size and default quality."""
        if key in self._pool:
            return self._pool[key]
        cache_key = (key, 0, 0, DEFAULT_QUALITY)
        cached = self._cached(cache_key)
        if cached is None:
            cached = self._render(key)
            self._remember(cache_key, cached)
        return cached

    def _render(self, key: int) -> bytes:
        """Render and encode sample ``key`` (pure; may run concurrently)."""
        width, height = image_size(key, self.seed, self.size_range)
        return jpeg_bytes(render(sample_spec(key, self.seed), width, height, photo_like=self.photo_like))

    def _cached(self, cache_key: tuple[int, int, int, int]) -> bytes | None:
        """LRU lookup, refreshing the entry's recency."""
        with self._lock:
            if cache_key in self._cache:
                self._cache.move_to_end(cache_key)
                return self._cache[cache_key]
            return None

    def _remember(self, cache_key: tuple[int, int, int, int], data: bytes) -> None:
        """LRU insert, evicting the oldest entries beyond the byte budget."""
        with self._lock:
            if cache_key not in self._cache:
                self._cache[cache_key] = data
                self._cache_bytes += len(data)
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1])


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
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the per-request access log."""

    def do_GET(self) -> None:
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
                url, caption, kind = f"{self.base_url}/fault/{fault_at[i]}/{i}", self.store.spec(i)["caption"], "fault"
            else:
                pair = next(pairs)
                url, caption, kind = self.base_url + pair.path, pair.caption, pair.noise
            rows.append({"url": url, "caption": caption, "noise": kind, "fault": fault_at.get(i)})
        return rows

    @staticmethod
    def write_url_list(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
        """Write ``rows`` as .parquet, .csv, .tsv or .jsonl (by extension); returns the path."""
        import pyarrow as pa
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

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
    parser = argparse.ArgumentParser(prog="align-ray demo-web", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--rows", type=int, default=2000, help="URL-list rows to write")
    parser.add_argument("--output", default="urls.parquet", help=".parquet, .csv, .tsv or .jsonl")
    parser.add_argument("--faults", action="store_true", help="mix in every transport/decoding fault")
    parser.add_argument("--noise", action=argparse.BooleanOptionalAction, default=True,
                        help="ALIGN-style alt-text and image noise")
    parser.add_argument("--photo-like", action="store_true", help="textured ~100-200 KB JPEGs")
    parser.add_argument("--pool-size", type=int, default=None, help="serve only this many distinct images")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``align-ray demo-web``: serve the noisy web and write its URL list until SIGINT/SIGTERM."""
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with NoisyWeb(args.host, args.port, args.seed, args.photo_like, pool_size=args.pool_size) as web:
        rows = web.url_rows(args.rows, noise=args.noise, faults=args.faults)
        path = web.write_url_list(args.output, rows)
        print(f"serving {web.base_url}\nwrote {len(rows)} URLs to {path}\nCtrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
    return 0
