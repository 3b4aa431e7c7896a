"""Fixtures for the score tests: the serve tests' tiny saved model and dev-set corpus (one
broken image), and that corpus written as a complete data-stage directory of 3 shards."""

from __future__ import annotations

import hashlib

import pytest

from align_ray.data.hashing import text_hash
from tests.filter import crafted
from tests.serve import conftest as serve_fixtures

# the serve tests' fixtures, shared rather than copied
corpus, embedder, tiny_model = serve_fixtures.corpus, serve_fixtures.embedder, serve_fixtures.tiny_model

SHARD = 16   # 47 corpus rows -> shards of 16, 16, 15


@pytest.fixture(scope="session")
def stage_in(corpus, tmp_path_factory):
    """The corpus as a data-stage output (real image bytes in ``jpg``)."""
    c = crafted.Corpus()
    for i, r in enumerate(corpus["rows"]):
        sha = hashlib.sha256(r["image"]).hexdigest()
        c.rows.append({"key": f"{i:014d}", "url": r["url"], "text": r["text"], "jpg": r["image"],
                       "width": 64, "height": 64, "original_width": 64, "original_height": 64,
                       "format": "png", "sha256": sha, "phash": int(sha[:16], 16),
                       "text_hash": text_hash(r["text"]), "final_url": None,
                       "num_bytes": len(r["image"])})
    out = tmp_path_factory.mktemp("stage_in") / "data"
    crafted.write_stage1(c, out, shard_size=SHARD)
    return out
