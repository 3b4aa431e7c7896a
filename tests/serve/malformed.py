"""A seeded generator of bad HTTP requests for the API: every one must get a 4xx.

Each case is ``(name, method, path, requests-kwargs)``.  Families: malformed JSON, wrong types,
empty / oversize lists, texts over the cap, invalid base64, non-image bytes, truncated images,
decompression bombs, oversize bodies (declared and chunked), unknown modality, ``k`` out of
range, bad embeddings, bad classify templates, unknown fields, wrong methods and paths, and the
same for clip-retrieval's ``/knn-service`` and ``/metadata`` (plus private ``image_url`` targets).
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from typing import Any, Iterator

Case = tuple[str, str, str, dict[str, Any]]
JSON_HEADERS = {"Content-Type": "application/json"}


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A valid-looking PNG header claiming ``width x height`` with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_bytes(size: int = 32) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _raw(body: bytes | str, headers: dict | None = None) -> dict[str, Any]:
    return {"data": body.encode() if isinstance(body, str) else body,
            "headers": headers if headers is not None else JSON_HEADERS}


def _json(obj: Any) -> dict[str, Any]:
    return _raw(json.dumps(obj))


def families(limits, dim: int) -> dict[str, list[Case]]:
    """Fixed cases per family (the generator below samples and mutates them)."""
    jpg = jpeg_bytes()
    good_img = _b64(jpg)
    long_text = "x" * (limits.max_text_chars + 1)
    not_images = [b"hello world", b"<html><body>404</body></html>", b"\x00" * 64, b"GIF89a" + b"\x00" * 10,
                  b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, jpg[: len(jpg) // 3], jpg[:20]]
    bad_b64 = ["###", "abc", "YWJj=", "Y" * 5, "not base64 at all!", "%%%%", "\u00e9t\u00e9"]
    fam: dict[str, list[Case]] = {}
    fam["json"] = [(f"json-{i}", "POST", p, _raw(b)) for i, b in enumerate(
        ['{"texts": ["a"', "{texts: [1]}", "", "{", '{"texts": ["a"]} trailing', "[1, 2",
         b"\xff\xfe\x00garbage", "nul\x00l", '{"texts": ["a"],}', "'single'"])
        for p in ("/v1/embed/text", "/v1/embed/image", "/v1/search", "/v1/classify")]
    deep = "[" * 100000 + "]" * 100000
    fam["json"] += [("json-deep", "POST", "/v1/search", _raw('{"embedding": ' + deep + "}")),
                    ("json-null", "POST", "/v1/search", _raw("null")),
                    ("json-array", "POST", "/v1/embed/text", _raw('["a", "b"]')),
                    ("json-nan", "POST", "/v1/search", _raw('{"embedding": [NaN, 1.0]}')),
                    ("json-text-plain", "POST", "/v1/embed/text",
                     _raw('{"texts": ["a"]}', {"Content-Type": "text/plain"}))]
    fam["types"] = [(f"types-{i}", "POST", p, _json(o)) for i, (p, o) in enumerate([
        ("/v1/embed/text", {"texts": "a single string"}), ("/v1/embed/text", {"texts": [1, 2]}),
        ("/v1/embed/text", {"texts": [["nested"]]}), ("/v1/embed/text", {"texts": None}),
        ("/v1/embed/text", {"texts": {"a": 1}}), ("/v1/embed/text", {}),
        ("/v1/embed/text", {"text": ["typo"]}), ("/v1/embed/image", {"images": good_img}),
        ("/v1/embed/image", {"images": [123]}), ("/v1/embed/image", {"images": [{"b64": good_img}]}),
        ("/v1/search", {"text": 5}), ("/v1/search", {"text": "a", "k": "10"}),
        ("/v1/search", {"text": "a", "k": 2.5}), ("/v1/search", {"text": "a", "k": True}),
        ("/v1/search", {"text": "a", "dedup": "yes"}), ("/v1/search", {"text": ["a"]}),
        ("/v1/search", {"embedding": "0.1,0.2"}), ("/v1/search", {"embedding": ["a"] * dim}),
        ("/v1/classify", {"image": good_img, "labels": "cat"}),
        ("/v1/classify", {"image": [good_img], "labels": ["cat"]}),
        ("/v1/classify", {"image": good_img, "labels": ["cat"], "templates": "{}"}),
        ("/v1/search", {"text": "a", "extra_field": 1}),
    ])]
    fam["sizes"] = [(f"sizes-{i}", "POST", p, _json(o)) for i, (p, o) in enumerate([
        ("/v1/embed/text", {"texts": []}), ("/v1/embed/text", {"texts": ["a"] * (limits.max_texts + 1)}),
        ("/v1/embed/text", {"texts": [""]}), ("/v1/embed/text", {"texts": ["   "]}),
        ("/v1/embed/text", {"texts": ["ok", long_text]}), ("/v1/search", {"text": long_text}),
        ("/v1/search", {"text": ""}), ("/v1/embed/image", {"images": []}),
        ("/v1/embed/image", {"images": [good_img] * (limits.max_images + 1)}),
        ("/v1/classify", {"image": good_img, "labels": []}),
        ("/v1/classify", {"image": good_img, "labels": ["l"] * (limits.max_labels + 1)}),
        ("/v1/classify", {"image": good_img, "labels": ["cat"], "templates": []}),
        ("/v1/classify", {"image": good_img, "labels": ["cat"],
                          "templates": ["{}"] * (limits.max_templates + 1)}),
        ("/v1/classify", {"image": good_img, "labels": [long_text]}),
        ("/v1/embed/image", {"images": [_b64(b"\xff" * (limits.max_image_bytes + 10))]}),
    ])]
    fam["base64"] = [(f"b64-{i}", "POST", p, _json(mk(s))) for i, s in enumerate(bad_b64)
                     for p, mk in (("/v1/embed/image", lambda s: {"images": [s]}),
                                   ("/v1/search", lambda s: {"image": s}),
                                   ("/v1/classify", lambda s: {"image": s, "labels": ["a"]}))]
    fam["not_image"] = [(f"notimg-{i}", "POST", p, _json(mk(_b64(b)))) for i, b in enumerate(not_images)
                        for p, mk in (("/v1/embed/image", lambda s: {"images": [good_img, s]}),
                                      ("/v1/search", lambda s: {"image": s, "modality": "image"}),
                                      ("/v1/classify", lambda s: {"image": s, "labels": ["a", "b"]}))]
    bombs = [png_bomb(), png_bomb(100000, 3), png_bomb(2**31 - 1, 2**31 - 1), png_bomb(0, 10)]
    fam["bomb"] = [(f"bomb-{i}", "POST", p, _json(mk(_b64(b)))) for i, b in enumerate(bombs)
                   for p, mk in (("/v1/embed/image", lambda s: {"images": [s]}),
                                 ("/v1/search", lambda s: {"image": s}),
                                 ("/v1/classify", lambda s: {"image": s, "labels": ["a"]}))]
    big = limits.max_body_bytes + 1024
    fam["body"] = [
        ("body-declared", "POST", "/v1/embed/text", _json({"texts": ["a" * big]})),
        ("body-chunked", "POST", "/v1/embed/text",
         {"data": (c for c in [b'{"texts": ["'] + [b"a" * 65536] * (big // 65536 + 1) + [b'"]}']),
          "headers": JSON_HEADERS}),
    ]
    fam["search"] = [(f"search-{i}", "POST", "/v1/search", _json(o)) for i, o in enumerate([
        {"text": "a", "modality": "video"}, {"text": "a", "modality": ""}, {"text": "a", "modality": None, "k": 0},
        {"text": "a", "k": 0}, {"text": "a", "k": -1}, {"text": "a", "k": limits.max_k + 1},
        {"text": "a", "k": 10**30}, {}, {"k": 5}, {"text": "a", "image": good_img},
        {"text": "a", "embedding": [0.1] * dim}, {"embedding": [0.1] * (dim - 1)},
        {"embedding": [0.0] * dim}, {"embedding": []}, {"embedding": [1e400] * dim},
        {"embedding": [10**400] + [0.1] * (dim - 1)},
        {"embedding": [0.1] * (dim + 1)}, {"text": "a", "nprobe": 0}, {"text": "a", "ef": "64"},
        {"text": "a", "nprobe": 10**6}, {"text": "a", "ef": -3}, {"text": "a", "nprobe": 1.5},
        {"text": "a", "index": "no-such-index"}, {"text": "a", "index": 5}, {"text": "a", "index": ""},
    ])]
    fam["classify"] = [(f"classify-{i}", "POST", "/v1/classify", _json(o)) for i, o in enumerate([
        {"image": good_img, "labels": ["cat"], "templates": ["no placeholder"]},
        {"image": good_img, "labels": ["cat"], "templates": ["{} and {}"]},
        {"image": good_img, "labels": ["cat"], "templates": ["{label}"]},
        {"labels": ["cat"]}, {"image": good_img}, {"image": "", "labels": ["cat"]},
        {"image": good_img, "labels": [""]},
        {"image": good_img, "labels": ["c" * (limits.max_text_chars - 1)], "templates": ["a photo of {}"]},
    ])]
    # clip-retrieval's API (align_ray/serve/knn_service.py): its clients send JSON with any or
    # no Content-Type, so bodies go without one here
    knn = [{"image": _b64(b)} for b in not_images + bombs] + [
        {"image": s} for s in bad_b64 if s] + [
        {"text": "a", "indice_name": "no-such-index"}, {"text": "a", "num_images": 0},
        {"text": "a", "num_images": limits.max_k + 1}, {"text": "a", "num_result_ids": 0},
        {"text": "a", "num_result_ids": 10**9}, {"text": "a", "num_images": "40"},
        {"text": "a", "modality": "video"}, {"text": 5}, {"text": long_text}, {},
        {"text": "", "image": None}, {"embedding_input": [0.1] * (dim - 1)},
        {"embedding_input": [0.0] * dim}, {"embedding_input": ["a"] * dim},
        {"embedding_input": [10**400] + [0.1] * (dim - 1)},
        {"embedding_input": "0.1,0.2"}, {"image_url": "http://169.254.169.254/latest/meta-data/"},
        {"image_url": "http://10.1.2.3/a.jpg"}, {"image_url": "http://[fd00::1]/a.jpg"},
        {"image_url": "http://100.64.0.1/a.jpg"}, {"image_url": "http://192.0.0.192/a.jpg"},
        {"image_url": "gopher://127.0.0.1/"}, {"image_url": "not a url"}, {"image_url": 7},
        {"image_url": "http://" + "a" * 5000 + ".com/x.jpg"},
    ]
    fam["knn"] = [(f"knn-{i}", "POST", "/knn-service", {"data": json.dumps(o).encode()})
                  for i, o in enumerate(knn)] + [
        (f"metadata-{i}", "POST", "/metadata", {"data": json.dumps(o).encode()})
        for i, o in enumerate([{"ids": [-1]}, {"ids": [10**9]}, {"ids": "1,2"}, {"ids": [1.5]},
                               {}, {"ids": [0], "indice_name": "nope"},
                               {"ids": list(range(20_000))}])] + [
        ("knn-get", "GET", "/knn-service", {}), ("indices-post", "POST", "/indices-list", {}),
        ("knn-array", "POST", "/knn-service", {"data": b"[1]"}),
        ("knn-null", "POST", "/knn-service", {"data": b"null"}),
        ("knn-bad-json", "POST", "/knn-service", {"data": b"{text: a}"}),
    ]
    fam["routes"] = [
        ("route-get-search", "GET", "/v1/search", {}), ("route-put-embed", "PUT", "/v1/embed/text", {}),
        ("route-unknown", "GET", "/v2/nothing", {}), ("route-image-nonint", "GET", "/v1/image/abc", {}),
        ("route-image-missing", "GET", "/v1/image/99999999", {}),
        ("route-image-negative", "GET", "/v1/image/-1", {}),
        ("route-delete-health", "DELETE", "/healthz", {}),
    ]
    return fam


def _valid_json(data: Any) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, TypeError, RecursionError):
        return False


def _mutate(rng: random.Random, case: Case) -> Case:
    """A variant that is never valid JSON: a strict prefix of a JSON document, or the document
    with one byte replaced by 0xff (invalid UTF-8)."""
    name, method, path, kw = case
    data = kw.get("data")
    if not isinstance(data, (bytes, bytearray)) or len(data) < 4 or not _valid_json(data):
        return case
    cut = rng.randrange(1, len(data) - 1)
    if rng.random() < 0.5:
        return f"{name}~cut{cut}", method, path, {**kw, "data": data[:cut]}
    return f"{name}~ff{cut}", method, path, {**kw, "data": data[:cut] + b"\xff" + data[cut + 1:]}


def generate(limits, dim: int, n: int = 520, seed: int = 0) -> Iterator[Case]:
    """Every fixed case once, then seeded samples (half of them mutated) until ``n``."""
    rng = random.Random(seed)
    fam = families(limits, dim)
    fixed = [c for cases in fam.values() for c in cases]
    yield from fixed
    pool = [c for c in fixed if not c[0].startswith("body-")]   # keep large bodies few
    for _ in range(max(0, n - len(fixed))):
        case = rng.choice(pool)
        yield _mutate(rng, case) if rng.random() < 0.5 else case
