"""The per-row facts and the verdict logic of the global plan, without Ray (hand answers)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from align_ray.data.hashing import text_hash
from align_ray.filter.config import FilterConfig
from align_ray.filter.plan import decide, prepare
from align_ray.filter.vocab import cut


def meta(rows):
    return pa.table({
        "key": [f"{i:014d}" for i in range(len(rows))],
        "text": [r[0] for r in rows],
        "sha256": [r[1] * 64 for r in rows],
        "phash": pa.array([r[2] for r in rows], pa.uint64()),
        "text_hash": pa.array([text_hash(r[0]) for r in rows], pa.uint64()),
        "original_width": pa.array([r[3] for r in rows], pa.int32()),
        "original_height": pa.array([r[4] for r in rows], pa.int32()),
        "shard": pa.array([0] * len(rows), pa.int32()),
    })


def test_prepare_pair_rules_image_id_and_eval_distance():
    t = meta([("one two three", "a", 0, 300, 201), ("one two", "b", 0b111, 300, 201),
              ("one two three", "c", 0, 200, 300), ("x y z", "d", 2 ** 63, 900, 300)])
    out = prepare(t, FilterConfig(), np.array([0b1], np.uint64))
    assert out.column("pair_reason").to_pylist() == [None, "too_few_tokens", "image_too_small",
                                                     "aspect_ratio"]
    assert out.column("eval_dist").to_pylist() == [1, 2, 1, 2]
    assert out.column("img_id").to_pylist()[0] == int("a" * 16, 16)
    assert out.column("key_id").to_pylist() == [0, 1, 2, 3]
    assert out.column("n_tok").to_pylist() == [3, 2, 3, 3]
    ph = prepare(t, FilterConfig(image_identity="phash"), np.array([], np.uint64))
    assert ph.column("img_id").to_pylist() == [0, 7, 0, 2 ** 63]
    assert ph.column("eval_dist").to_pylist() == [64] * 4


def facts(**cols):
    n = len(next(iter(cols.values())))
    base = {"key_id": list(range(n)), "shard": [0] * n, "text_hash": [1] * n, "img_id": [2] * n,
            "pair_reason": [None] * n, "eval_dist": [64] * n, "n_texts": [1] * n,
            "n_images": [1] * n, "first_key": list(range(n)), "gram_n": [None] * n,
            "rare_gram": [None] * n}
    base.update(cols)
    return pa.table({k: pa.array(v, pa.string() if k in ("pair_reason", "rare_gram") else
                                 (pa.uint64() if k in ("text_hash", "img_id") else None))
                     for k, v in base.items()})


def test_decide_boundaries_and_order():
    cfg = FilterConfig()
    got = decide(facts(n_texts=[1000, 1001, 1, 1, 1, 1, 1, 1],
                       n_images=[10, 1, 11, 1, 1, 1, 1, 1],
                       eval_dist=[64, 64, 64, 8, 9, 64, 64, 3],
                       gram_n=[None, None, None, None, None, 1, None, 1],
                       rare_gram=[None, None, None, None, None, "zzq", None, "q"],
                       first_key=[0, 1, 2, 3, 4, 5, 0, 7],
                       pair_reason=[None] * 7 + ["image_too_small"]), cfg, 2)
    assert got.column("reason").to_pylist() == [
        None, "image_too_many_texts", "text_too_many_images", "eval_near_duplicate", None,
        "rare_token", "exact_duplicate", "image_too_small"]
    detail = got.column("detail").to_pylist()
    assert "1001 distinct alt-texts" in detail[1] and "'zzq' seen 1x" in detail[5]
    assert detail[6] == "same image and text as key 00000000000000"


def test_disabled_rules_and_dedup_switch():
    f = facts(n_images=[11, 11], first_key=[0, 0])
    cfg = FilterConfig(disabled_rules=["text_too_many_images"], dedup=False)
    assert decide(f, cfg, 2).column("reason").to_pylist() == [None, None]
    assert decide(f, FilterConfig(), 2).column("reason").to_pylist() == [
        "text_too_many_images", "text_too_many_images"]


def test_vocabulary_cut_top_k_ties_and_min_count():
    hist = {100: 1, 50: 2, 10: 3, 1: 10}     # 16 grams
    assert cut(hist, 10 ** 8, 2) == 2        # K does not bind: min_count decides
    assert cut(hist, 3, 1) == 50             # top-3 = the 100 and the two 50s
    assert cut(hist, 4, 1) == 50             # a 4th slot would split the 10s: all left out
    assert cut(hist, 6, 1) == 10
    assert cut(hist, 6, 20) == 20            # min_count wins when stricter
    assert cut({}, 5, 2) == 2
