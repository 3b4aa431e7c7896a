"""A crafted download-stage output with hand-computed answers for every filter rule.

Written in the download stage's exact layout (parquet/, dropped/, _shards/, stats.json), so the
filter reads it like a real one.  ``EXPECTED`` maps every key to the reason it must get (None =
kept); the comments give the arithmetic.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from align_ray.data.hashing import text_hash
from align_ray.layout import DROPPED_FIELDS, SAMPLE_FIELDS

W = [f"w{i}" for i in range(20)]            # the common words (each seen >= 1500 times)
S1 = " ".join(W[:10])                       # skew: one text on 3000 distinct images
S2 = " ".join(W[10:])                       # a second frequent text, 1500 images


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


class Corpus:
    def __init__(self):
        self.rows: list[dict] = []
        self.expected: dict[str, str | None] = {}

    def add(self, image: str, text: str, expect: str | None, w: int = 400, h: int = 300,
            phash: int | None = None) -> None:
        key = f"{len(self.rows):014d}"
        sha = hashlib.sha256(image.encode()).hexdigest()
        self.rows.append({"key": key, "url": f"http://img.test/{image}", "text": text,
                          "width": 8, "height": 8, "original_width": w, "original_height": h,
                          "format": "jpeg", "sha256": sha,
                          "phash": phash if phash is not None else int(sha[:16], 16),
                          "text_hash": text_hash(text), "final_url": None, "num_bytes": 100})
        self.expected[key] = expect


def build(eval_phash: int) -> Corpus:
    c = Corpus()
    # per-pair rules at their boundaries (shorter side > 200, aspect < 3, 3..20 unigrams)
    c.add("p1", "w0 w1 w2", "image_too_small", 300, 199)
    c.add("p2", "w0 w1 w3", "image_too_small", 300, 200)
    c.add("p3", "w0 w1 w4", None, 300, 201)
    c.add("p4", "w0 w1 w5", None, 897, 300)                     # 2.99
    c.add("p5", "w0 w1 w6", "aspect_ratio", 900, 300)           # 3.0
    c.add("p6", "w0 w1 w7", "aspect_ratio", 300, 900)
    c.add("p7", "w0 w1", "too_few_tokens")                      # 2 tokens
    c.add("p8", " ".join(W), None)                              # 20 tokens
    c.add("p9", " ".join(W + ["w0"]), "too_many_tokens")        # 21 tokens
    # images per text: 10 -> kept, 11 -> every row dropped
    for i in range(10):
        c.add(f"t10-{i}", "w3 w4 w5", None)
    for i in range(11):
        c.add(f"t11-{i}", "w6 w7 w8", "text_too_many_images")
    # texts per image: 1000 distinct texts -> kept, 1001 -> dropped (each text on 2 images)
    texts = [f"w{a} w{b} w{c_} w{d}" for a in range(10) for b in range(10) for c_ in range(10)
             for d in (19,)][:1000]
    for t in texts:
        c.add("img-1000", t, None)
    for t in texts + ["w1 w1 w1 w1"]:
        c.add("img-1001", t, "image_too_many_texts")
    # skew: a text on 3000 distinct images, another on 1500
    for i in range(3000):
        c.add(f"s1-{i}", S1, "text_too_many_images")
    for i in range(1500):
        c.add(f"s2-{i}", S2, "text_too_many_images")
    # exact duplicates collapse onto the smallest key
    for expect in (None, "exact_duplicate", "exact_duplicate"):
        c.add("dup", "w9 w10 w11 w12", expect)
    c.add("dup", "w9 w10 w11 w13", None)                        # same image, other text
    # rare tokens: "zebra" seen once -> dropped; "quokka" seen twice (min count 2) -> kept
    c.add("r1", "w1 w2 zebra", "rare_token")
    c.add("r2", "w1 w2 quokka", None)
    c.add("r3", "w2 w3 quokka", None)
    # eval-set near-duplicates: 3 bits from an eval image -> dropped; 20 bits -> kept
    c.add("e1", "w4 w5 w6 w7", "eval_near_duplicate", phash=eval_phash ^ 0b10101)
    c.add("e2", "w4 w5 w6 w8", None, phash=eval_phash ^ 0xFFFFF)
    # the safety hook (align_ray.filter.safety:keyword_hook, words "w14 w15 w16 nsfw") flags
    # rows that passed every other rule
    c.add("h1", "w1 w2 nsfw", "unsafe")
    c.add("h2", "w2 w1 nsfw", "unsafe")
    return c


def write_stage1(c: Corpus, out: Path, shard_size: int = 1000, extra_fields: list = ()) -> dict:
    """Write ``c`` as a complete download-stage output with 2 download-dropped rows per shard.
    Rows without their own ``jpg`` get a small red JPEG; ``extra_fields`` (name, type) are
    columns a later stage added (e.g. ``pair_score``)."""
    jpg = _jpeg()
    schema = pa.schema(SAMPLE_FIELDS + list(extra_fields))
    dropped_schema = pa.schema(DROPPED_FIELDS)
    for sub in ("parquet", "dropped", "_shards"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_in, n_out, n_drop = 0, 0, 0
    for s, start in enumerate(range(0, len(c.rows), shard_size)):
        name = f"00000_{s:05d}"
        rows = [{"jpg": jpg, **r} for r in c.rows[start:start + shard_size]]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "parquet" / f"{name}.parquet")
        drops = [{"key": f"9{s:05d}0000000{i}", "url": "http://img.test/404", "text": "gone",
                  "reason": "http_404", "detail": "", "retryable": False} for i in range(2)]
        pq.write_table(pa.Table.from_pylist(drops, schema=dropped_schema),
                       out / "dropped" / f"{name}.parquet")
        marker = {"shard": name, "input_rows": len(rows) + 2, "output_rows": len(rows),
                  "dropped": {"http_404": 2}, "parts": [f"parquet/{name}.parquet"],
                  "dropped_file": f"dropped/{name}.parquet"}
        (out / "_shards" / f"{name}.json").write_text(json.dumps(marker))
        n_in, n_out, n_drop = n_in + len(rows) + 2, n_out + len(rows), n_drop + 2
    stats = {"input_rows": n_in, "output_rows": n_out, "dropped": {"http_404": n_drop},
             "complete": True}
    (out / "stats.json").write_text(json.dumps(stats))
    return stats


def expected_counts(c: Corpus) -> dict[str, int]:
    out: dict[str, int] = {}
    for reason in c.expected.values():
        if reason:
            out[reason] = out.get(reason, 0) + 1
    return out


