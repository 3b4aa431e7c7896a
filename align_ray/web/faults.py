"""The fault catalogue: what can go wrong between a URL and a decoded image.

``GET /fault/<name>/<id>`` runs ``FAULTS[name]``.  The id keeps URLs distinct and picks the
sample whose picture is served when the fault ends in a valid image, so a downloader that
recovers (retry, redirect, odd-but-valid encoding) still gets a correctly captioned pair.
``EXPECTED_OUTCOME`` is the ground truth a correct downloader is scored against.
"""

from __future__ import annotations

import functools
import gzip
import io
import random
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

import numpy as np
from PIL import Image, ImageEnhance

from align_ray.web.synth import derive_seed

MIB = 1 << 20
TOO_LARGE_BYTES = 30 * MIB
BOMB_SIDE = 30000
DRIP_INTERVAL_S = 0.5
DEFAULT_DELAY_S = 30.0
_ZEROS = bytes(MIB)


@dataclass
class FaultContext:
    """Everything a fault handler needs to answer one request."""

    http: BaseHTTPRequestHandler  # the live request; write the response through it
    name: str
    fault_id: int
    query: Mapping[str, str]
    jpeg: Callable[[], bytes]  # the valid JPEG of sample ``fault_id``
    stop: threading.Event  # set when the server shuts down: long handlers must return
    first_request: Callable[[str], bool]  # True only the first time a key is seen

    def picture(self) -> Image.Image:
        """The sample's picture as a loaded RGB image, for re-encoding in awkward formats."""
        return Image.open(io.BytesIO(self.jpeg())).convert("RGB")

    def url(self, location: str) -> str:
        """``location`` made absolute against the Host the client used."""
        host = self.http.headers.get("Host") or "%s:%d" % self.http.server.server_address[:2]
        return f"http://{host}{location}"


FaultHandler = Callable[[FaultContext], None]


# ---------------------------------------------------------------- response helpers
def send(ctx: FaultContext, status: int, body: bytes, content_type: str = "image/jpeg",
         headers: Mapping[str, str] | None = None, content_length: int | None = None) -> None:
    """A complete response; ``content_length`` may lie about ``len(body)`` on purpose."""
    ctx.http.send_response(status)
    ctx.http.send_header("Content-Type", content_type)
    ctx.http.send_header("Content-Length", str(len(body) if content_length is None else content_length))
    for key, value in (headers or {}).items():
        ctx.http.send_header(key, value)
    ctx.http.end_headers()
    ctx.http.wfile.write(body)


def send_chunked(ctx: FaultContext, chunks: Iterable[bytes], content_type: str = "image/jpeg") -> None:
    """A ``Transfer-Encoding: chunked`` response without Content-Length; stops with the server."""
    ctx.http.send_response(200)
    ctx.http.send_header("Content-Type", content_type)
    ctx.http.send_header("Transfer-Encoding", "chunked")
    ctx.http.end_headers()
    for chunk in chunks:
        if ctx.stop.is_set():
            ctx.http.close_connection = True
            return
        ctx.http.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    ctx.http.wfile.write(b"0\r\n\r\n")


def redirect(ctx: FaultContext, status: int, location: str) -> None:
    """A redirect with an empty body."""
    send(ctx, status, b"", "text/plain", {"Location": location})


def _padded(head: bytes, total: int) -> Iterator[bytes]:
    """``head`` then zero bytes, ``total`` bytes in all, in chunks of at most 1 MiB."""
    yield head
    left = total - len(head)
    while left > 0:
        yield _ZEROS[: min(left, MIB)]
        left -= MIB


# ---------------------------------------------------------------- HTTP status faults
def status_fault(status: int, retry_after: bool = False) -> FaultHandler:
    """Always answer ``status`` with a small text body (and ``Retry-After: 1`` if asked)."""
    headers = {"Retry-After": "1"} if retry_after else {}

    def handler(ctx: FaultContext) -> None:
        send(ctx, status, f"{status} fault\n".encode(), "text/plain", headers)

    return handler


def status_once(status: int) -> FaultHandler:
    """``status`` with ``Retry-After: 1`` on the first request for this id, then the image."""

    def handler(ctx: FaultContext) -> None:
        if ctx.first_request(f"{ctx.name}/{ctx.fault_id}"):
            send(ctx, status, f"{status} fault, retry\n".encode(), "text/plain", {"Retry-After": "1"})
        else:
            send(ctx, 200, ctx.jpeg())

    return handler


# ---------------------------------------------------------------- redirects
_REDIRECT_CODES = (302, 301, 307, 308)


def redirect_chain(hops: int) -> FaultHandler:
    """``hops`` redirects (mixed codes; relative, absolute and path-relative Locations), then the image."""

    def handler(ctx: FaultContext) -> None:
        hop = int(ctx.query.get("hop", "0"))
        if hop >= hops:
            send(ctx, 200, ctx.jpeg())
            return
        path = f"/fault/{ctx.name}/{ctx.fault_id}?hop={hop + 1}"
        location = (path, ctx.url(path), f"{ctx.fault_id}?hop={hop + 1}")[hop % 3]
        redirect(ctx, _REDIRECT_CODES[hop % len(_REDIRECT_CODES)], location)

    return handler


def redirect_loop(ctx: FaultContext) -> None:
    """A -> B -> A -> ... forever."""
    target = "" if ctx.query.get("hop") == "b" else "?hop=b"
    redirect(ctx, 302, f"/fault/{ctx.name}/{ctx.fault_id}{target}")


def redirect_to(location: Callable[[FaultContext], str]) -> FaultHandler:
    """A single 302 to ``location(ctx)``: for SSRF probes the client must refuse to follow."""

    def handler(ctx: FaultContext) -> None:
        redirect(ctx, 302, location(ctx))

    return handler


# ---------------------------------------------------------------- slow and oversized transfers
def delay_headers(ctx: FaultContext) -> None:
    """Say nothing for ``?s=`` seconds (default 30), then the image; gives up when the server stops."""
    if ctx.stop.wait(float(ctx.query.get("s", DEFAULT_DELAY_S))):
        ctx.http.close_connection = True
        return
    send(ctx, 200, ctx.jpeg())


def slow_drip(ctx: FaultContext) -> None:
    """Honest headers, then one body byte every 0.5 s: only a total deadline catches it."""
    body = ctx.jpeg()
    ctx.http.send_response(200)
    ctx.http.send_header("Content-Type", "image/jpeg")
    ctx.http.send_header("Content-Length", str(len(body)))
    ctx.http.end_headers()
    for i in range(len(body)):
        if ctx.stop.wait(DRIP_INTERVAL_S):
            ctx.http.close_connection = True
            return
        ctx.http.wfile.write(body[i : i + 1])


def endless(ctx: FaultContext) -> None:
    """A JPEG header followed by zero-valued scan bytes, forever, delimited by connection close."""
    ctx.http.send_response(200)
    ctx.http.send_header("Content-Type", "image/jpeg")
    ctx.http.send_header("Connection", "close")
    ctx.http.end_headers()
    ctx.http.wfile.write(ctx.jpeg()[:-2])  # without the EOI marker
    block = _ZEROS[: 64 * 1024]
    while not ctx.stop.is_set():
        ctx.http.wfile.write(block)


def too_large(ctx: FaultContext) -> None:
    """A valid JPEG padded to 30 MiB, with an honest Content-Length: only a size cap drops it."""
    ctx.http.send_response(200)
    ctx.http.send_header("Content-Type", "image/jpeg")
    ctx.http.send_header("Content-Length", str(TOO_LARGE_BYTES))
    ctx.http.end_headers()
    for chunk in _padded(ctx.jpeg(), TOO_LARGE_BYTES):
        if ctx.stop.is_set():
            ctx.http.close_connection = True
            return
        ctx.http.wfile.write(chunk)


def too_large_chunked(ctx: FaultContext) -> None:
    """The same 30 MiB body, chunked: the size is unknown until it has been read."""
    send_chunked(ctx, _padded(ctx.jpeg(), TOO_LARGE_BYTES))


# ---------------------------------------------------------------- broken bodies
_HTML = b"<!doctype html><html><head><title>Not here</title></head><body><p>Image moved.</p></body></html>\n"
_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<circle cx="32" cy="32" r="24" fill="red"/></svg>\n')


def truncated_jpeg(ctx: FaultContext) -> None:
    """The first 60 % of a valid JPEG, with a Content-Length that matches the cut body."""
    body = ctx.jpeg()
    send(ctx, 200, body[: len(body) * 6 // 10])


def short_content_length(ctx: FaultContext) -> None:
    """Announce N bytes, send N/2, close the connection."""
    body = ctx.jpeg()
    send(ctx, 200, body[: len(body) // 2], content_length=len(body))
    ctx.http.close_connection = True


def garbage(ctx: FaultContext) -> None:
    """Random bytes labelled image/jpeg (deterministic per id)."""
    rng = random.Random(derive_seed("garbage", ctx.fault_id))
    send(ctx, 200, rng.randbytes(rng.randint(4096, 16384)))


# ---------------------------------------------------------------- PNG writing and the bomb
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One length-prefixed, CRC-suffixed PNG chunk."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A non-interlaced PNG from an already zlib-compressed, filtered IDAT stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_BOMB_LOCK = threading.Lock()


@functools.cache
def _build_png_bomb() -> bytes:
    """A valid 30000x30000 8-bit grayscale all-black PNG (~0.9 MB), never materialising 900 MB."""
    rows_per_chunk = 1000
    rows = bytes((BOMB_SIDE + 1) * rows_per_chunk)  # per row: filter byte 0, then zero pixels
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(rows) for _ in range(BOMB_SIDE // rows_per_chunk)]
    parts.append(compressor.flush())
    return png_file(BOMB_SIDE, BOMB_SIDE, 8, 0, b"".join(parts))


def png_bomb_bytes() -> bytes:
    """The decompression bomb, built once per process (a few seconds) and then cached."""
    with _BOMB_LOCK:
        return _build_png_bomb()


# ---------------------------------------------------------------- valid but awkward encodings
def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """``img`` saved in ``fmt`` with PIL ``params``."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def png16(img: Image.Image) -> bytes:
    """16-bit-per-channel RGB PNG (PIL cannot write one, so the rows are packed by hand)."""
    pixels = np.asarray(img.convert("RGB"), np.uint16) * 257
    rows = np.concatenate(
        [np.zeros((img.height, 1), np.uint8), pixels.astype(">u2").view(np.uint8).reshape(img.height, -1)], axis=1
    )
    return png_file(img.width, img.height, 16, 2, zlib.compress(rows.tobytes(), 6))


def palette_alpha(img: Image.Image) -> bytes:
    """Mode-P PNG whose top-left (background) palette entry is transparent."""
    paletted = img.quantize(colors=32)
    return _encode(paletted, "PNG", transparency=paletted.getpixel((0, 0)))


def animated_gif(img: Image.Image) -> bytes:
    """A looping three-frame GIF (the picture at three brightness levels)."""
    frames = [ImageEnhance.Brightness(img).enhance(f) for f in (1.0, 0.8, 1.2)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)


def exif_rotated(img: Image.Image) -> bytes:
    """Stored 320x200 with EXIF Orientation=6, so it displays upright as 200x320."""
    upright = img.resize((200, 320))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())


def encoded(encoder: Callable[[Image.Image], bytes], content_type: str) -> FaultHandler:
    """Serve the sample's picture re-encoded by ``encoder`` with a truthful Content-Type."""

    def handler(ctx: FaultContext) -> None:
        send(ctx, 200, encoder(ctx.picture()), content_type)

    return handler


def with_headers(headers: Mapping[str, str]) -> FaultHandler:
    """Serve the valid JPEG with extra response ``headers``."""

    def handler(ctx: FaultContext) -> None:
        send(ctx, 200, ctx.jpeg(), headers=headers)

    return handler


def gzipped(ctx: FaultContext) -> None:
    """The JPEG with ``Content-Encoding: gzip`` (the client must inflate it)."""
    send(ctx, 200, gzip.compress(ctx.jpeg(), mtime=0), headers={"Content-Encoding": "gzip"})


def chunked(ctx: FaultContext) -> None:
    """The JPEG in four chunks, without Content-Length."""
    body = ctx.jpeg()
    step = -(-len(body) // 4)
    send_chunked(ctx, (body[i : i + step] for i in range(0, len(body), step)))


# ---------------------------------------------------------------- the catalogue
def _constant(body: bytes, content_type: str) -> FaultHandler:
    """Always ``200`` with ``body`` as ``content_type``."""
    return lambda ctx: send(ctx, 200, body, content_type)


FAULTS: dict[str, FaultHandler] = {
    "404": status_fault(404),
    "410": status_fault(410),
    "500": status_fault(500),
    "503": status_fault(503),
    "429": status_fault(429, retry_after=True),
    "429once": status_once(429),
    "503once": status_once(503),
    "redirect": redirect_chain(3),
    "redirect_long": redirect_chain(20),
    "redirect_loop": redirect_loop,
    "redirect_private": redirect_to(lambda ctx: "http://10.0.0.1/img.jpg"),
    "redirect_metadata": redirect_to(lambda ctx: "http://169.254.169.254/latest/meta-data/"),
    "redirect_host": redirect_to(
        lambda ctx: f"http://internal.test:{ctx.http.server.server_address[1]}/img/{ctx.fault_id}.jpg"
    ),
    "delay_headers": delay_headers,
    "slow_drip": slow_drip,
    "endless": endless,
    "too_large": too_large,
    "too_large_chunked": too_large_chunked,
    "html": _constant(_HTML, "text/html; charset=utf-8"),
    "html_as_jpeg": _constant(_HTML, "image/jpeg"),
    "empty": _constant(b"", "image/jpeg"),
    "truncated_jpeg": truncated_jpeg,
    "short_content_length": short_content_length,
    "garbage": garbage,
    "png_bomb": lambda ctx: send(ctx, 200, png_bomb_bytes(), "image/png"),
    "unsupported": _constant(_SVG, "image/svg+xml"),
    "cmyk": encoded(lambda img: _encode(img.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
    "png16": encoded(png16, "image/png"),
    "palette_alpha": encoded(palette_alpha, "image/png"),
    "animated_gif": encoded(animated_gif, "image/gif"),
    "exif_rotated": encoded(exif_rotated, "image/jpeg"),
    "gzip": gzipped,
    "chunked": chunked,
    "webp": encoded(lambda img: _encode(img, "WEBP", quality=80), "image/webp"),
    "noai": with_headers({"X-Robots-Tag": "noai"}),
    "noimageai": with_headers({"X-Robots-Tag": "noimageai"}),
}
FAULT_NAMES: tuple[str, ...] = tuple(FAULTS)

# What a correct downloader does with each fault: "ok" = a decoded, correctly captioned image
# (after retries, redirects or format conversion); "drop" = a dropped row.  Drops assume the
# usual limits: <= 10 redirects, a total deadline well under 30 s, a size cap under 30 MiB,
# a pixel cap under 900 MP, no private/link-local targets, and honouring X-Robots-Tag noai.
EXPECTED_OUTCOME: dict[str, str] = {
    name: "ok"
    if name in {"429once", "503once", "redirect", "cmyk", "png16", "palette_alpha", "animated_gif",
                "exif_rotated", "gzip", "chunked", "webp"}
    else "drop"
    for name in FAULT_NAMES
}
