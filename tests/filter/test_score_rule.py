"""The CLIP-score rules (``score_min``, ``score_keep_fraction``) of the filter stage on a real
local Ray cluster: a stage directory whose ``pair_score`` column has planted ties, spread over
several shards (so over several blocks), every frequency rule off so the answer is a pure
function of the scores."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from align_ray.data.errors import InputError
from align_ray.filter import pipeline, quantile
from align_ray.filter.config import RULES, SCORE_RULES, FilterConfig
from align_ray.filter.plan import keep_count
from tests.filter import crafted
from tests.filter.test_pipeline import read_dir

N, SHARD = 150, 40   # 4 shards: 40, 40, 40, 30 rows
FREQUENCY_RULES = [r for r in RULES if r not in SCORE_RULES]


K = math.ceil(0.3 * N)   # 45 rows kept by score_keep_fraction 0.3


def _scores() -> np.ndarray:
    rng = np.random.default_rng(7)
    s = np.round(rng.uniform(0.1, 0.4, N), 2).astype(np.float32)
    order = np.argsort(-s, kind="stable")
    s[order[K - 2:K + 3]] = s[order[K - 1]]   # a tie of 5 rows across the cut
    return s


def crafted_rows() -> crafted.Corpus:
    c = crafted.Corpus()
    for i in range(N):
        c.add(f"img{i}", f"w{i % 7} w{i % 5} w{i % 3}", None)
    for row, s in zip(c.rows, _scores()):
        row["pair_score"] = float(s)
    return c


@pytest.fixture(scope="module")
def scored_stage(tmp_path_factory):
    c = crafted_rows()
    out = tmp_path_factory.mktemp("scored") / "stage"
    crafted.write_stage1(c, out, shard_size=SHARD, extra_fields=[("pair_score", pa.float32())])
    return out, {r["key"]: r["pair_score"] for r in c.rows}


def _best(scores: dict[str, float], k: int) -> set[str]:
    """Brute force: the k best rows by (score descending, key ascending)."""
    order = sorted(scores, key=lambda key: (-np.float32(scores[key]), key))
    return set(order[:k])


def _run(stage, tmp_path, **rules) -> tuple[dict, dict[str, str | None]]:
    cfg = FilterConfig(input=str(stage), output=str(tmp_path / "out"), num_partitions=3,
                       disabled_rules=FREQUENCY_RULES, report=True, write_webdataset=False,
                       **rules)
    stats = pipeline.run(cfg)
    kept = read_dir(tmp_path / "out", "parquet")
    dropped = read_dir(tmp_path / "out", "dropped", "0*.parquet")   # this stage's drops
    verdict = {k: None for k in kept.column("key").to_pylist()}
    verdict.update(zip(dropped.column("key").to_pylist(), dropped.column("reason").to_pylist()))
    return stats, verdict


def test_score_min_and_keep_fraction_exact_global_top_k(ray_cluster, scored_stage, tmp_path):
    """score_min 0.15 lies below the fraction's cut, so the kept rows are exactly the K best."""
    stage, scores = scored_stage
    stats, verdict = _run(stage, tmp_path, score_min=0.15, score_keep_fraction=0.3)
    assert keep_count(0.3, N) == K and len(verdict) == N
    top = _best(scores, K)
    assert {key for key, r in verdict.items() if r is None} == top
    for key, s in scores.items():   # each row's reason: the first rule it breaks
        want = "score_min" if s < np.float32(0.15) else None if key in top else "score_keep_fraction"
        assert verdict[key] == want, (key, s)
    counts = Counter(r for r in verdict.values() if r)
    assert counts["score_min"] > 0 and counts["score_keep_fraction"] > 0
    assert stats["stages"]["filter"]["dropped"] == dict(counts)
    assert stats["input_rows"] == stats["output_rows"] + sum(stats["dropped"].values())
    cut = stats["score_cut"]
    kth = sorted(scores.values(), reverse=True)[K - 1]
    assert (cut["keep"], cut["rows"]) == (K, N) and cut["score"] == pytest.approx(kth)
    # the cut falls inside the planted tie: some rows with the K-th score kept, some dropped
    tied = [r for key, r in verdict.items() if scores[key] == kth]
    assert None in tied and "score_keep_fraction" in tied
    funnel = json.loads((tmp_path / "out" / "report.json").read_text())["funnel"]
    assert funnel == [   # the frequency rules (and the hook) are off here
        {"rule": "score_min", "dropped": counts["score_min"], "rows_left": N - counts["score_min"]},
        {"rule": "score_keep_fraction", "dropped": counts["score_keep_fraction"], "rows_left": K}]
    _check_score_report(tmp_path / "out", scores, {"score_min": 0.15,
                                                   "score_keep_fraction": cut["score"]})


def _check_score_report(out, scores: dict[str, float], thresholds: dict) -> None:
    """report.json's pair_score section against the planted scores: the histogram (0.01 bins
    from -1) holds every row in the bin of its score, the thresholds are the rules' cuts, and
    the examples are the 8 lowest and 8 highest rows by (score, key) with their captions; the
    two plots are real PNGs, and the examples one shows the thumbnails (non-white pixels)."""
    from PIL import Image

    from align_ray.filter.score_report import BINS, EXAMPLES

    sec = json.loads((out / "report.json").read_text())["pair_score"]
    want = np.zeros(BINS, int)
    for v in scores.values():
        want[min(BINS - 1, int((np.float64(np.float32(v)) + 1.0) / 0.01))] += 1
    assert sec["counts"] == want.tolist() and sec["rows"] == N and sec["missing"] == 0
    assert sec["thresholds"] == pytest.approx(thresholds)
    order = sorted(scores, key=lambda key: (np.float32(scores[key]), int(key)))
    texts = {r["key"]: r["text"] for r in crafted_rows().rows}
    for name, keys in (("lowest", order[:EXAMPLES]), ("highest", order[::-1][:EXAMPLES])):
        got = sec[name]
        assert [e["key"] for e in got] == keys, name
        assert [e["text"] for e in got] == [texts[k] for k in keys]
        assert [e["score"] for e in got] == pytest.approx([scores[k] for k in keys])
    for name in ("score.png", "score_examples.png"):
        img = Image.open(out / name)
        assert img.format == "PNG" and img.size[0] > 300
    px = np.asarray(Image.open(out / "score_examples.png").convert("RGB"))
    red = (px[..., 0] > 150) & (px[..., 1] < 100) & (px[..., 2] < 100)   # the red test JPEGs
    assert red.sum() > 16 * 500


def test_score_rules_are_off_until_set_and_need_the_column(ray_cluster, tmp_path):
    assert not FilterConfig().needs_score()
    assert not FilterConfig(score_min=0.1, disabled_rules=["score_min"]).needs_score()
    with pytest.raises(ValueError, match="score_keep_fraction"):
        FilterConfig(score_keep_fraction=1.5)
    c = crafted.Corpus()
    for i in range(5):
        c.add(f"i{i}", "w1 w2 w3", None)
    crafted.write_stage1(c, tmp_path / "plain")
    with pytest.raises(InputError, match="align-ray score"):
        pipeline.run(FilterConfig(input=str(tmp_path / "plain"), output=str(tmp_path / "o"),
                                  score_min=0.1))


@pytest.mark.parametrize("k", [0, 37, 150])
def test_radix_selection_over_every_digit_matches_a_sort(ray_cluster, k):
    """collect_limit=0 forces all six 16-bit histogram passes (score bits, then key bits)."""
    import ray.data

    rng = np.random.default_rng(k)
    score = np.round(rng.normal(0, 1, 150), 1).astype(np.float32)
    score[:3] = np.nan                            # missing scores rank last
    key = rng.permutation(150).astype(np.int64) * 10**9 + 12345   # unique, past 32 bits
    ds = ray.data.from_arrow([pa.table({"pair_score": score[i::4], "key_id": key[i::4]})
                              for i in range(4)])
    cut = quantile.top_k_cut(ds, k, 150, collect_limit=0)
    best = np.lexsort((key, -np.nan_to_num(score, nan=-np.inf)))[:k]
    assert set(np.flatnonzero(cut.keeps(score, key))) == set(best.tolist())
    assert cut.passes == (0 if k == 0 else 7)
