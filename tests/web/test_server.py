"""NoisyWeb over real HTTP on 127.0.0.1: images, determinism, every fault, URL lists, prompt stop."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageChops, ImageOps, ImageStat, UnidentifiedImageError

from align_ray.web import EXPECTED_OUTCOME, FAULT_NAMES, NOISE_KINDS, NoisyWeb
from align_ray.web.faults import TOO_LARGE_BYTES

Response = tuple[int, http.client.HTTPMessage, bytes]


@pytest.fixture(scope="module")
def web() -> Iterator[NoisyWeb]:
    with NoisyWeb(seed=0) as server:
        yield server


def fetch(url: str, timeout: float = 10.0) -> Response:
    """One GET without following redirects or inflating gzip: the raw response."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def open_image(body: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(body))
    img.load()
    return img


# ---------------------------------------------------------------- plain images
def test_healthz_and_unknown_routes(web: NoisyWeb) -> None:
    assert fetch(web.base_url + "/healthz")[::2] == (200, b"ok\n")
    assert fetch(web.base_url + "/nope")[0] == 404
    assert fetch(web.base_url + "/fault/no_such_fault/1")[0] == 404


def test_native_image_decodes_at_its_deterministic_size(web: NoisyWeb) -> None:
    for idx in (0, 7, 123):
        status, headers, body = fetch(f"{web.base_url}/img/{idx}.jpg")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        img = open_image(body)
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == web.store.size(idx)
        assert all(128 <= side <= 512 for side in img.size)


@pytest.mark.parametrize(
    ("query", "size"), [("w=40&h=30", (40, 30)), ("w=900&h=120", (900, 120)), ("w=64&h=64&q=50", (64, 64))]
)
def test_requested_sizes(web: NoisyWeb, query: str, size: tuple[int, int]) -> None:
    status, _, body = fetch(f"{web.base_url}/img/3.jpg?{query}")
    assert status == 200 and open_image(body).size == size


def test_width_alone_keeps_aspect_ratio(web: NoisyWeb) -> None:
    native_w, native_h = web.store.size(3)
    img = open_image(fetch(f"{web.base_url}/img/3.jpg?w=100")[2])
    assert img.size == (100, round(native_h * 100 / native_w))


@pytest.mark.parametrize("query", ["w=0", "h=5000", "q=101", "w=abc"])
def test_bad_image_params_are_400(web: NoisyWeb, query: str) -> None:
    assert fetch(f"{web.base_url}/img/3.jpg?{query}")[0] == 400


def test_keep_alive_reuses_one_connection(web: NoisyWeb) -> None:
    parts = urlsplit(web.base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        sockets = []
        for path in ("/img/1.jpg", "/fault/404/1", "/fault/redirect/1", "/fault/chunked/1", "/img/2.jpg?w=50"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert not resp.will_close
            sockets.append(conn.sock)
        assert len(set(sockets)) == 1
    finally:
        conn.close()


def relative_rows(web: NoisyWeb) -> list[dict[str, object]]:
    """``url_rows`` with the (port-dependent) base URL stripped."""
    return [{**r, "url": r["url"].removeprefix(web.base_url)} for r in web.url_rows(200, faults=True)]


def test_same_seed_same_bytes_across_instances() -> None:
    with NoisyWeb(seed=3) as first, NoisyWeb(seed=3) as second, NoisyWeb(seed=4) as other:
        for path in ("/img/5.jpg", "/img/6.jpg?w=90&h=40&q=70", "/fault/cmyk/2", "/fault/garbage/9"):
            assert fetch(first.base_url + path)[2] == fetch(second.base_url + path)[2]
        assert fetch(first.base_url + "/img/5.jpg")[2] != fetch(other.base_url + "/img/5.jpg")[2]
        assert relative_rows(first) == relative_rows(second)


def test_pool_serves_id_modulo_pool_size() -> None:
    with NoisyWeb(pool_size=4, photo_like=True, image_size_range=(64, 96)) as web:
        assert fetch(web.base_url + "/img/1.jpg")[2] == fetch(web.base_url + "/img/9.jpg")[2]
        assert web.store.spec(9)["caption"] == web.store.spec(1)["caption"]
        rows = web.url_rows(12, noise=False)
        assert rows[1]["caption"] == rows[5]["caption"] == rows[9]["caption"]


# ---------------------------------------------------------------- the fault catalogue
REQUIRED_FAULTS = {
    "404", "410", "500", "503", "429", "429once", "503once", "redirect", "redirect_long", "redirect_loop",
    "redirect_private", "redirect_metadata", "redirect_host", "delay_headers", "slow_drip", "endless",
    "too_large", "too_large_chunked", "html", "html_as_jpeg", "empty", "truncated_jpeg",
    "short_content_length", "garbage", "png_bomb", "unsupported", "cmyk", "png16", "palette_alpha",
    "animated_gif", "exif_rotated", "gzip", "chunked", "webp", "noai", "noimageai",
}


def test_catalogue_and_expected_outcomes() -> None:
    assert set(FAULT_NAMES) == REQUIRED_FAULTS == set(EXPECTED_OUTCOME)
    ok = {name for name, outcome in EXPECTED_OUTCOME.items() if outcome == "ok"}
    assert ok == {"429once", "503once", "redirect", "cmyk", "png16", "palette_alpha", "animated_gif",
                  "exif_rotated", "gzip", "chunked", "webp"}
    assert set(EXPECTED_OUTCOME.values()) == {"ok", "drop"}


@pytest.mark.parametrize("name", ["404", "410", "500", "503", "429"])
def test_status_faults(web: NoisyWeb, name: str) -> None:
    for _ in range(2):
        status, headers, body = fetch(f"{web.base_url}/fault/{name}/1")
        assert status == int(name) and body
    assert (headers["Retry-After"] == "1") == (name == "429")


@pytest.mark.parametrize("name", ["429once", "503once"])
def test_once_faults_succeed_on_retry(web: NoisyWeb, name: str) -> None:
    for fault_id in (11, 12):
        status, headers, _ = fetch(f"{web.base_url}/fault/{name}/{fault_id}")
        assert status == int(name[:3]) and headers["Retry-After"] == "1"
        status, _, body = fetch(f"{web.base_url}/fault/{name}/{fault_id}")
        assert status == 200 and body == fetch(f"{web.base_url}/img/{fault_id}.jpg")[2]


def follow(url: str, limit: int = 30) -> tuple[list[tuple[int, str]], Response]:
    """Follow redirects by hand: the (status, Location) hops and the final response."""
    hops = []
    for _ in range(limit):
        response = fetch(url)
        if response[0] not in (301, 302, 303, 307, 308):
            return hops, response
        hops.append((response[0], response[1]["Location"]))
        url = urljoin(url, response[1]["Location"])
    raise AssertionError(f"more than {limit} redirects")


@pytest.mark.parametrize(("name", "n_hops"), [("redirect", 3), ("redirect_long", 20)])
def test_redirect_chains_end_at_the_image(web: NoisyWeb, name: str, n_hops: int) -> None:
    hops, (status, _, body) = follow(f"{web.base_url}/fault/{name}/4")
    assert len(hops) == n_hops and status == 200
    assert body == fetch(f"{web.base_url}/img/4.jpg")[2]
    assert {301, 302, 307} <= {code for code, _ in hops}
    assert any(loc.startswith("http://") for _, loc in hops) and any(loc.startswith("/") for _, loc in hops)


def test_urllib_follows_short_chain_but_not_long_one(web: NoisyWeb) -> None:
    with urllib.request.urlopen(f"{web.base_url}/fault/redirect/5", timeout=10) as resp:
        assert open_image(resp.read()).size == web.store.size(5)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{web.base_url}/fault/redirect_long/5", timeout=10)


def test_redirect_loop_returns_to_start(web: NoisyWeb) -> None:
    start = f"{web.base_url}/fault/redirect_loop/3"
    first = fetch(start)[1]["Location"]
    second = fetch(urljoin(start, first))[1]["Location"]
    assert urljoin(start, first) != start and urljoin(start, second) == start


@pytest.mark.parametrize(("name", "location"), [
    ("redirect_private", "http://10.0.0.1/img.jpg"),
    ("redirect_metadata", "http://169.254.169.254/latest/meta-data/"),
    ("redirect_host", "http://internal.test:{port}/img/8.jpg"),
])
def test_ssrf_redirects(web: NoisyWeb, name: str, location: str) -> None:
    status, headers, _ = fetch(f"{web.base_url}/fault/{name}/8")
    assert status == 302 and headers["Location"] == location.format(port=urlsplit(web.base_url).port)


def test_delay_headers(web: NoisyWeb) -> None:
    started = time.monotonic()
    status, _, body = fetch(f"{web.base_url}/fault/delay_headers/2?s=0.3")
    assert status == 200 and open_image(body) and time.monotonic() - started >= 0.3
    with pytest.raises(TimeoutError):
        fetch(f"{web.base_url}/fault/delay_headers/2", timeout=0.3)


def test_slow_drip_sends_one_byte_per_half_second(web: NoisyWeb) -> None:
    parts = urlsplit(web.base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("GET", "/fault/slow_drip/2")
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.headers["Content-Length"]) > 1000
        started = time.monotonic()
        assert resp.read(2) == b"\xff\xd8"
        assert 0.8 <= time.monotonic() - started < 3
    finally:
        conn.close()


def test_endless_streams_without_length(web: NoisyWeb) -> None:
    parts = urlsplit(web.base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        conn.request("GET", "/fault/endless/2")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
        assert "Content-Length" not in resp.headers and resp.will_close
        head = resp.read(4 << 20)
        assert head[:2] == b"\xff\xd8" and len(head) == 4 << 20
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["too_large", "too_large_chunked"])
def test_too_large(web: NoisyWeb, name: str) -> None:
    status, headers, body = fetch(f"{web.base_url}/fault/{name}/2")
    assert status == 200 and len(body) == TOO_LARGE_BYTES and body[:2] == b"\xff\xd8"
    if name == "too_large":
        assert headers["Content-Length"] == str(TOO_LARGE_BYTES)
    else:
        assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers


@pytest.mark.parametrize(("name", "content_type", "prefix"), [
    ("html", "text/html; charset=utf-8", b"<!doctype html>"),
    ("html_as_jpeg", "image/jpeg", b"<!doctype html>"),
    ("unsupported", "image/svg+xml", b"<svg"),
    ("empty", "image/jpeg", b""),
])
def test_wrong_content(web: NoisyWeb, name: str, content_type: str, prefix: bytes) -> None:
    status, headers, body = fetch(f"{web.base_url}/fault/{name}/2")
    assert status == 200 and headers["Content-Type"] == content_type and body.startswith(prefix)
    assert headers["Content-Length"] == str(len(body)) and (body or name == "empty")


def test_truncated_jpeg_is_a_prefix_with_matching_length(web: NoisyWeb) -> None:
    full = fetch(f"{web.base_url}/img/6.jpg")[2]
    status, headers, body = fetch(f"{web.base_url}/fault/truncated_jpeg/6")
    assert status == 200 and headers["Content-Length"] == str(len(body))
    assert body == full[: len(full) * 6 // 10] and not body.endswith(b"\xff\xd9")


def test_short_content_length_closes_early(web: NoisyWeb) -> None:
    full = fetch(f"{web.base_url}/img/6.jpg")[2]
    with pytest.raises(http.client.IncompleteRead) as caught:
        fetch(f"{web.base_url}/fault/short_content_length/6")
    assert caught.value.partial == full[: len(full) // 2] and caught.value.expected == len(full) - len(full) // 2


def test_garbage_is_not_an_image(web: NoisyWeb) -> None:
    status, _, body = fetch(f"{web.base_url}/fault/garbage/6")
    assert status == 200 and len(body) >= 4096 and body == fetch(f"{web.base_url}/fault/garbage/6")[2]
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(body))


def test_png_bomb_header_without_decoding(web: NoisyWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    status, headers, body = fetch(f"{web.base_url}/fault/png_bomb/1", timeout=30)
    assert status == 200 and headers["Content-Type"] == "image/png" and len(body) < 2 << 20
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    img = Image.open(io.BytesIO(body))
    assert img.size == (30000, 30000) and img.mode == "L"
    Image.open(io.BytesIO(body)).verify()  # chunk CRCs, no pixel decoding


def fault_image(web: NoisyWeb, name: str, fault_id: int = 6) -> tuple[http.client.HTTPMessage, Image.Image]:
    status, headers, body = fetch(f"{web.base_url}/fault/{name}/{fault_id}")
    assert status == 200
    return headers, open_image(body)


def test_awkward_but_valid_encodings(web: NoisyWeb) -> None:
    size = web.store.size(6)
    assert fault_image(web, "cmyk")[1].mode == "CMYK"
    png16 = fetch(f"{web.base_url}/fault/png16/6")[2]
    assert png16[24:26] == b"\x10\x02" and open_image(png16).size == size  # IHDR: 16-bit RGB
    palette = fault_image(web, "palette_alpha")[1]
    assert palette.mode == "P" and "transparency" in palette.info
    gif = fault_image(web, "animated_gif")[1]
    assert gif.format == "GIF" and gif.n_frames >= 3 and gif.size == size
    assert fault_image(web, "webp")[1].format == "WEBP"


def test_exif_rotated(web: NoisyWeb) -> None:
    _, img = fault_image(web, "exif_rotated")
    assert img.size == (320, 200) and img.getexif()[0x0112] == 6
    upright = ImageOps.exif_transpose(img)
    expected = open_image(fetch(f"{web.base_url}/img/6.jpg")[2]).resize((200, 320))
    assert upright.size == (200, 320)
    assert sum(ImageStat.Stat(ImageChops.difference(upright, expected)).mean) / 3 < 5  # displays upright


def test_gzip_and_chunked_transfer(web: NoisyWeb) -> None:
    jpeg = fetch(f"{web.base_url}/img/6.jpg")[2]
    _, headers, body = fetch(f"{web.base_url}/fault/gzip/6")
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == jpeg
    _, headers, body = fetch(f"{web.base_url}/fault/chunked/6")
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers and body == jpeg


@pytest.mark.parametrize("name", ["noai", "noimageai"])
def test_robots_tag(web: NoisyWeb, name: str) -> None:
    headers, img = fault_image(web, name)
    assert headers["X-Robots-Tag"] == name and img.format == "JPEG"


# ---------------------------------------------------------------- URL lists
def test_url_rows_cover_every_fault_and_noise_kind(web: NoisyWeb) -> None:
    rows = web.url_rows(600, faults=True, fault_fraction=0.1)
    assert len(rows) == 600 and all(set(r) == {"url", "caption", "noise", "fault"} for r in rows)
    faulted = [r for r in rows if r["fault"]]
    assert {r["fault"] for r in faulted} == set(FAULT_NAMES) and len(faulted) == 60
    assert all(r["noise"] == "fault" and f"/fault/{r['fault']}/" in r["url"] for r in faulted)
    assert {r["noise"] for r in rows} == {*NOISE_KINDS, "fault"}
    assert {r["noise"] for r in web.url_rows(100, noise=False)} == {"clean"}


def test_duplicates_share_bytes_and_near_duplicates_are_resized(web: NoisyWeb) -> None:
    rows = web.url_rows(300)
    dup = next(r for r in rows if r["noise"] == "dup_image")
    source = dup["url"].split("?")[0]
    assert fetch(dup["url"])[2] == fetch(source)[2] and dup["url"] != source
    near = next(r for r in rows if r["noise"] == "near_dup")
    original, resized = (open_image(fetch(url)[2]) for url in (near["url"].split("?")[0], near["url"]))
    assert resized.size != original.size and abs(resized.width / original.width - 0.91) < 0.07


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_write_url_list_round_trips(web: NoisyWeb, tmp_path: Path, suffix: str) -> None:
    rows = web.url_rows(80, faults=True)
    path = web.write_url_list(tmp_path / f"urls{suffix}", rows)
    if suffix == ".parquet":
        table = pq.read_table(path)
    elif suffix == ".jsonl":
        table = None
        assert [json.loads(line) for line in path.read_text("utf-8").splitlines()] == rows
    else:
        delimiter = "," if suffix == ".csv" else "\t"
        table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    if table is not None:
        assert table.column_names == ["url", "caption", "noise", "fault"]
        assert table.column("caption").to_pylist() == [r["caption"] for r in rows]


# ---------------------------------------------------------------- lifecycle
def test_stop_is_prompt_with_slow_connections_open() -> None:
    web = NoisyWeb().start()
    outcomes: dict[str, str] = {}

    def hang(name: str) -> None:
        try:
            fetch(f"{web.base_url}/fault/{name}/1", timeout=20)
            outcomes[name] = "completed"
        except (OSError, http.client.HTTPException) as exc:
            outcomes[name] = type(exc).__name__

    clients = [threading.Thread(target=hang, args=(name,), daemon=True)
               for name in ("slow_drip", "delay_headers", "endless")]
    for client in clients:
        client.start()
    time.sleep(0.5)
    started = time.monotonic()
    web.stop()
    assert time.monotonic() - started < 2
    for client in clients:
        client.join(timeout=2)
    assert not any(client.is_alive() for client in clients)
    # endless is delimited by connection close, so being cut off looks like a complete body
    assert outcomes == {"slow_drip": "IncompleteRead", "delay_headers": "RemoteDisconnected", "endless": "completed"}


def test_demo_web_entry_point(tmp_path: Path) -> None:
    output = tmp_path / "urls.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "align_ray.web", "--port", "0", "--rows", "50", "--faults", "--photo-like",
         "--image-size-range", "64", "96", "--pool-size", "8", "--output", str(output)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first_line = proc.stdout.readline()
        assert first_line.startswith("serving http://127.0.0.1:")
        base_url = first_line.split()[1]
        assert fetch(base_url + "/healthz")[0] == 200
        rows = [json.loads(line) for line in output.read_text("utf-8").splitlines()]
        assert len(rows) == 50 and {r["fault"] for r in rows} - {None} == set(FAULT_NAMES)
        image = open_image(fetch(next(r["url"] for r in rows if r["noise"] == "clean"))[2])
        assert all(64 <= side <= 96 for side in image.size)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
