"""clip-retrieval's API on a running app, through clip-retrieval's own client and front end.

``ClipClient`` is the installed ``clip-retrieval`` package's own code (``clip_client.py``, loaded
from the package's directory: the package's ``__init__`` imports its whole back end (flask,
sentence-transformers, ...), which is installed without its dependencies; see .ci/run).  Its
front end is the package's own static build, served from another 127.0.0.1 origin and run in
headless Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import importlib.util
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.serve.conftest import TEST_LIMITS, wait


def _package_dir() -> Path:
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("clip-retrieval is required: pip install --no-deps clip-retrieval==2.45.0 (.ci/run)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def clip_client_module():
    path = _package_dir() / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLOW_S = 6.0      # /slow.png answers after this: past the app's url_fetch deadline (conftest: 3 s)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/slow"):     # a host that accepts, then answers too late
            time.sleep(SLOW_S)
        super().do_GET()


@pytest.fixture(scope="module")
def static(tmp_path_factory, corpus, serve_app):
    """A static file server on 127.0.0.1 (another origin than the app): a corpus image, a text
    file, and clip-retrieval's front end build under /front/, with the config.json its
    ``clip-retrieval front --url_column`` would write (the corpus' source URLs are not
    reachable, so the front shows our thumbnails: ``image_url``)."""
    client, cfg = serve_app
    root = tmp_path_factory.mktemp("static")
    (root / "query.png").write_bytes(corpus["rows"][4]["image"])
    (root / "notes.txt").write_text("not an image")
    (root / "slow.png").write_bytes(corpus["rows"][4]["image"])
    # one byte over the app's max_image_bytes, and a bomb: 25 Mpx of one colour in a few KB
    (root / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(TEST_LIMITS["max_image_bytes"] - 7))
    from PIL import Image

    Image.new("L", (5000, 5000)).save(root / "bomb.png")
    assert (root / "bomb.png").stat().st_size < TEST_LIMITS["max_image_bytes"]
    front = root / "front"
    front.mkdir()
    for item in (_package_dir().parent / "front" / "build").iterdir():
        if item.name != "config.json":
            (front / item.name).symlink_to(item)
    (front / "config.json").write_text(json.dumps({
        "defaultBackend": client.base_url, "defaultIndex": _name(cfg), "urlColumn": "image_url"}))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()


def _name(cfg) -> str:
    return cfg.resolved_index_name()


def _same(knn: list[dict], ours: list[dict]) -> None:
    assert [r["id"] for r in knn] == [h["id"] for h in ours]
    np.testing.assert_allclose([r["similarity"] for r in knn], [h["score"] for h in ours], atol=1e-6)


def test_clip_client_queries_equal_v1_search(serve_app, clip_client_module, static, corpus, tmp_path):
    client, cfg = serve_app
    cc = clip_client_module
    base, root = static
    knn = cc.ClipClient(url=client.base_url + "/knn-service", indice_name=_name(cfg),
                        modality=cc.Modality.IMAGE, num_images=5, deduplicate=False)
    image = corpus["rows"][4]["image"]

    text_hits = knn.query(text="grinning face")
    _same(text_hits, client.search(text="grinning face", k=5, modality="image"))
    assert all(r["caption"] is not None and r["url"] for r in text_hits)

    path = tmp_path / "q.png"
    path.write_bytes(image)
    expected = client.search(image=image, k=5, modality="image")
    _same(knn.query(image=str(path)), expected)
    _same(knn.query(image=f"{base}/query.png"), expected)          # image_url, fetched by us
    assert expected[0]["text"] == corpus["rows"][4]["text"]

    emb = client.embed_text(["red heart"])[0].tolist()
    _same(knn.query(embedding_input=emb), client.search(embedding=emb, k=5, modality="image"))

    captions = cc.ClipClient(url=client.base_url + "/knn-service", indice_name=_name(cfg),
                             modality=cc.Modality.TEXT, num_images=7, deduplicate=True)
    _same(captions.query(image=str(path)), client.search(image=image, k=7, modality="text", dedup=True))


def test_result_ids_metadata_and_indices_list(serve_app):
    client, cfg = serve_app
    # the default index first, then the named ones (conftest ann_indexes)
    assert client.request("GET", "/indices-list").json() == [_name(cfg), "hnsw", "ivf"]
    body = {"text": "smiling face", "modality": "image", "num_images": 3, "num_result_ids": 12,
            "indice_name": _name(cfg), "deduplicate": False, "use_safety_model": True,
            "aesthetic_score": "", "aesthetic_weight": ""}
    # the front end posts JSON as text/plain
    r = client.request("POST", "/knn-service", data=json.dumps(body),
                       headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert r.status_code == 200, r.text
    results = r.json()
    _same(results, client.search(text="smiling face", k=12, modality="image"))
    assert [("caption" in x) for x in results] == [True] * 3 + [False] * 9
    ids = [x["id"] for x in results]
    meta = client.request("POST", "/metadata", data=json.dumps({"ids": ids, "indice_name": _name(cfg)}))
    assert meta.status_code == 200, meta.text
    got = meta.json()
    assert [m["id"] for m in got] == ids
    for m, x in zip(got[:3], results[:3]):
        assert m["metadata"]["caption"] == x["caption"] and m["metadata"]["url"] == x["url"]
    # thumbnails are absolute URLs the front end can load from its own origin
    thumb = got[0]["metadata"]["image_url"]
    assert thumb.startswith("http://127.0.0.1:") and requests.get(thumb, timeout=30).content[:2] == b"\xff\xd8"


BAD = [
    ("unknown indice_name", {"text": "a", "indice_name": "nope"}, 404),
    ("num_images 0", {"text": "a", "num_images": 0}, 422),
    ("num_images too many", {"text": "a", "num_images": 10**6}, 422),
    ("num_result_ids too many", {"text": "a", "num_result_ids": 10**7}, 422),
    ("num_images a string", {"text": "a", "num_images": "40"}, 422),
    ("bad modality", {"text": "a", "modality": "audio"}, 422),
    ("no query", {"modality": "image"}, 422),
    ("embedding wrong dim", {"embedding_input": [0.1] * 7}, 422),
    ("embedding NaN", {"embedding_input": [float("nan")] * 128}, 422),
    ("embedding zeros", {"embedding_input": [0.0] * 128}, 422),
    ("image not base64", {"image": "%%%"}, 400),
    ("image not an image", {"image": base64.b64encode(b"hello").decode()}, 400),
    ("image_url metadata address", {"image_url": "http://169.254.169.254/latest/meta-data"}, 400),
    ("image_url private 10/8", {"image_url": "http://10.0.0.1/a.png"}, 400),
    ("image_url private 192.168", {"image_url": "http://192.168.1.1/a.png"}, 400),
    ("image_url IPv6 loopback", {"image_url": "http://[::1]/a.png"}, 400),
    ("image_url 0.0.0.0", {"image_url": "http://0.0.0.0/a.png"}, 400),
    ("image_url not http", {"image_url": "file:///etc/passwd"}, 400),
    ("image_url garbage", {"image_url": "http://"}, 400),
    ("image_url 404", {"image_url": "{base}/missing.png"}, 400),
    ("image_url not an image", {"image_url": "{base}/notes.txt"}, 400),
    # the download stage's guards, on the server's fetch: byte cap, bomb guard, deadline
    ("image_url over the byte cap", {"image_url": "{base}/big.png"}, 413),
    ("image_url a decompression bomb", {"image_url": "{base}/bomb.png"}, 413),
    ("image_url past the deadline", {"image_url": "{base}/slow.png"}, 400),
    ("text too long", {"text": "x" * 5000}, 413),
]


def test_bad_knn_requests_get_4xx_concurrently(serve_app, static):
    client, cfg = serve_app
    base, _ = static

    def send(case):
        name, body, want = case
        body = {k: (v.format(base=base) if isinstance(v, str) else v) for k, v in body.items()}
        r = client.request("POST", "/knn-service", data=json.dumps(body))
        js = r.json()
        return name, want, r.status_code, js.get("detail") if isinstance(js, dict) else js

    raw = [("malformed JSON", "{not json", 400), ("array body", "[1, 2]", 422),
           ("metadata id out of range", None, 404), ("metadata ids not ints", None, 422)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, BAD * 3))
    for name, body, want in raw:
        if body is None:
            payload = {"ids": [10**6]} if "range" in name else {"ids": ["a"]}
            r = client.request("POST", "/metadata", data=json.dumps(payload))
        else:
            r = client.request("POST", "/knn-service", data=body)
        results.append((name, want, r.status_code, r.json().get("detail")))
    wrong = [(n, want, got, d) for n, want, got, d in results if got != want or not d]
    assert not wrong, wrong
    assert client.healthz()["status"] == "ok"


def test_image_url_refuses_loopback_by_default():
    """Without ``allow_cidr`` the server's fetcher never fetches loopback (itself)."""
    from align_ray.serve.config import Limits, UrlFetchConfig
    from align_ray.serve.knn_service import ImageUrlFetcher
    from align_ray.serve.schemas import APIError

    async def go(url):
        fetcher = ImageUrlFetcher(UrlFetchConfig(), Limits())
        try:
            await fetcher.fetch(url)
        finally:
            if fetcher._fetcher is not None:
                await fetcher._fetcher.close()

    for url in ("http://127.0.0.1:1/a.png", "http://localhost/a.png", "http://[::ffff:127.0.0.1]/"):
        with pytest.raises(APIError) as e:
            asyncio.run(go(url))
        assert e.value.status == 400 and "not fetched" in e.value.message


def test_clip_retrieval_front_end_shows_our_images(serve_app, static, browser):
    """clip-retrieval's own static front end, on another origin, pointed at our server.

    The front end asks for 40 images out of 3,000 result ids with ``deduplicate`` on, and loads
    more on scroll; so what it shows is compared with our /knn-service answer to that same
    request, not with a plain top 40 (a duplicate dropped inside the top 40 lets rank 41 in)."""
    client, cfg = serve_app
    base, _ = static
    body = {"text": "smiling face", "modality": "image", "num_images": 40, "num_result_ids": 3000,
            "indice_name": _name(cfg), "deduplicate": True}
    r = client.request("POST", "/knn-service", data=json.dumps(body))
    assert r.status_code == 200, r.text
    ranked = [x["id"] for x in r.json()]
    top = set(ranked[:10])
    q = urllib.parse.urlencode({"query": "smiling face"})
    browser.get(f"{base}/front/index.html?{q}")
    images = """
      const seen = [];
      const walk = (root) => root.querySelectorAll('*').forEach(el => {
        if (el.tagName === 'IMG') seen.push(el);
        if (el.shadowRoot) walk(el.shadowRoot);
      });
      walk(document);
      return seen.filter(i => i.src.startsWith(arguments[0]) && i.complete && i.naturalWidth > 0)
                 .map(i => i.src);"""

    def shown_ids(d):
        ids = {int(s.rsplit("/", 1)[-1]) for s in d.execute_script(images, client.base_url)}
        return ids if top <= ids else False     # wait until our top 10 are all on screen

    shown = wait(browser, shown_ids, timeout=90)
    assert shown <= set(ranked), shown - set(ranked)
