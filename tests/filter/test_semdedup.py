"""SemDeDup in the filter stage: the within-cluster rule on hand-made embeddings, the real stage
on a scored stage directory with planted near-duplicate embeddings (every other rule off), and
the error when the input has not been through ``align-ray score``."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from align_ray import cli
from align_ray.data.errors import InputError
from align_ray.filter import pipeline, report, semdedup
from align_ray.filter.config import RULES, FilterConfig
from tests.filter import crafted
from tests.filter.test_pipeline import read_dir

D = 16
OTHER_RULES = [r for r in RULES if r != semdedup.RULE]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _near(base: np.ndarray, cos: float, rng) -> np.ndarray:
    """A unit vector at exactly cosine ``cos`` from the unit vector ``base``."""
    r = rng.normal(size=base.shape)
    r = _unit(r - (r @ base) * base)
    return cos * base + np.sqrt(1 - cos ** 2) * r


def test_within_cluster_rule_keeps_the_best_score_and_respects_the_threshold():
    rng = np.random.default_rng(0)
    a = _unit(rng.normal(size=D))
    b = _unit(_near(a, 0.0, rng))   # orthogonal to a: never a duplicate of it
    emb = np.stack([_near(a, 0.94, rng), _near(a, 0.99, rng), _near(a, 0.97, rng), a,
                    b, _near(b, 0.999, rng)]).astype(np.float32)
    keys = np.array([10, 11, 12, 13, 20, 21])
    score = np.array([0.2, 0.5, 0.3, 0.9, 0.4, 0.4], np.float32)   # 20/21 tie: key 20 wins
    drops = semdedup.cluster_drops(keys, score, emb, eps=0.05)
    # 13 has the best score: 11 (0.99) and 12 (0.97) go; 10 is 0.94 from 13 (just below the
    # 0.95 cut) and is compared only with kept rows, so it stays even if near 11 or 12
    assert drops == {11: (13, pytest.approx(0.99, abs=1e-5)),
                     12: (13, pytest.approx(0.97, abs=1e-5)),
                     21: (20, pytest.approx(0.999, abs=1e-5))}
    # the same cluster in any row order: the same answer
    perm = rng.permutation(len(keys))
    assert semdedup.cluster_drops(keys[perm], score[perm], emb[perm], 0.05) == drops
    # a pair just below the threshold is kept, just above it is dropped; eps 0 keeps all
    pair = np.stack([a, _near(a, 0.9499, rng)]).astype(np.float32)
    assert semdedup.cluster_drops(np.array([1, 2]), np.array([1.0, 0.5]), pair, 0.05) == {}
    assert semdedup.cluster_drops(np.array([1, 2]), np.array([1.0, 0.5]), pair, 0.0502) == {
        2: (1, pytest.approx(0.9499, abs=1e-5))}
    assert semdedup.cluster_drops(keys, score, emb, eps=0.0) == {}


GROUPS, COPIES, SINGLES = 6, 4, 30


@pytest.fixture(scope="module")
def sem_stage(tmp_path_factory):
    """6 groups of 4 near-duplicate embeddings (cosine >= 0.99 to the group's base) with
    distinct pair_scores, and 30 unrelated rows, in shards of 11 rows (several blocks)."""
    rng = np.random.default_rng(3)
    c, want = crafted.Corpus(), {}
    rows = []
    for g in range(GROUPS):
        base = _unit(rng.normal(size=D))
        scores = rng.permutation(COPIES) / 10 + 0.1
        for j in range(COPIES):
            rows.append((f"g{g}", _near(base, 0.995, rng) if j else base, float(scores[j])))
    for s in range(SINGLES):
        rows.append((f"s{s}", _unit(rng.normal(size=D)), 0.3))
    order = rng.permutation(len(rows))   # groups spread over shards
    best: dict[str, tuple] = {}
    for i in order:
        group, e, s = rows[i]
        c.add(f"img{i}", f"w{i} x y", None)
        c.rows[-1].update(pair_score=s, image_embedding=[float(v) for v in e.astype(np.float16)])
        key = c.rows[-1]["key"]
        want[key] = group
        if group.startswith("g") and (group not in best or s > best[group][0]):
            best[group] = (s, key)
    out = tmp_path_factory.mktemp("sem") / "stage"
    crafted.write_stage1(c, out, shard_size=11, extra_fields=[
        ("pair_score", pa.float32()), ("image_embedding", pa.list_(pa.float16(), D))])
    kept = {k for k, g in want.items() if g.startswith("s")} | {k for _, k in best.values()}
    return out, kept, len(rows)


def _run(stage, out, **kw):
    cfg = FilterConfig(input=str(stage), output=str(out), disabled_rules=OTHER_RULES,
                       write_webdataset=False, semdedup=True, semdedup_eps=0.05, **kw)
    stats = pipeline.run(cfg)
    kept = read_dir(out, "parquet")
    dropped = read_dir(out, "dropped", "0*.parquet")
    verdict = {k: None for k in kept.column("key").to_pylist()}
    verdict.update(zip(dropped.column("key").to_pylist(), dropped.column("reason").to_pylist()))
    return stats, verdict


def test_stage_drops_planted_duplicates_and_accounts_for_every_row(ray_cluster, sem_stage,
                                                                  tmp_path):
    stage, want_kept, n = sem_stage
    stats, verdict = _run(stage, tmp_path / "a", semdedup_clusters=3, num_partitions=3)
    assert len(verdict) == n
    assert {k for k, r in verdict.items() if r is None} == want_kept
    assert Counter(verdict.values())[semdedup.RULE] == GROUPS * (COPIES - 1)
    assert stats["stages"]["filter"]["dropped"] == {semdedup.RULE: GROUPS * (COPIES - 1)}
    assert stats["input_rows"] == stats["output_rows"] + sum(stats["dropped"].values())
    sem = stats["semdedup"]
    assert sem["clusters"] == 3 and sem["rows"] == n and sem["dropped"] == GROUPS * (COPIES - 1)
    assert sem["max"] >= sem["median"] > 0
    km = sem["kmeans"]   # started from every row (n < semdedup_train_rows), then refined
    assert km["train_rows"] == n and 1 <= km["passes"] == len(km["mean_cosine"]) <= 5
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["semdedup"]["rows"] == n
    assert f"k-means: start from {n} sampled rows, {km['passes']} passes" in \
        report.text_summary(rep)
    assert rep["funnel"] == [{"rule": semdedup.RULE, "dropped": GROUPS * (COPIES - 1),
                              "rows_left": n - GROUPS * (COPIES - 1)}]
    dropped = read_dir(tmp_path / "a", "dropped", "0*.parquet")
    assert all("cosine" in d for d in dropped.column("detail").to_pylist())
    # another partition count and auto k (1 cluster here): the same verdicts
    stats2, verdict2 = _run(stage, tmp_path / "b", num_partitions=1, report=False)
    assert verdict2 == verdict and stats2["semdedup"]["clusters"] == 1


def test_semdedup_needs_the_score_columns(tmp_path, capsys):
    c = crafted.Corpus()
    for i in range(5):
        c.add(f"i{i}", "w1 w2 w3", None)
    crafted.write_stage1(c, tmp_path / "plain", extra_fields=[("pair_score", pa.float32())])
    cfg = FilterConfig(input=str(tmp_path / "plain"), output=str(tmp_path / "o"), semdedup=True)
    with pytest.raises(InputError, match="image_embedding.*align-ray score"):
        pipeline.run(cfg)
    assert cli._run_filter_stage(cfg) == 2
    assert "run `align-ray score`" in capsys.readouterr().err
    assert not (tmp_path / "o" / "stats.json").exists()
    assert not FilterConfig().enabled(semdedup.RULE)
    assert not FilterConfig(semdedup=True, disabled_rules=[semdedup.RULE]).enabled(semdedup.RULE)
    with pytest.raises(ValueError, match="semdedup_eps"):
        FilterConfig(semdedup_eps=1.5)
    with pytest.raises(ValueError, match="semdedup_kmeans_passes >= 0"):
        FilterConfig(semdedup_kmeans_passes=-1)


# ---- on `align-ray score`'s real output: the serve corpus re-encodes the images of rows 3 and
# 5 as JPEG (rows 40, 41); the tiny model puts every other image far from its neighbours
from tests.score import conftest as score_fixtures  # noqa: E402
from tests.serve.conftest import DUP_IMAGES, N_BASE  # noqa: E402

# the score tests' fixtures, shared rather than copied
corpus, stage_in, tiny_model = score_fixtures.corpus, score_fixtures.stage_in, score_fixtures.tiny_model


def test_stage_on_score_output_drops_the_reencoded_copies(ray_cluster, tiny_model, stage_in,
                                                         tmp_path):
    from align_ray.score import pipeline as score_pipeline
    from align_ray.score.config import ScoreConfig

    scored = tmp_path / "scored"
    score_pipeline.run(ScoreConfig(model=tiny_model, input=str(stage_in), output=str(scored),
                                   batch_size=16, concurrency=1, num_cpus=1))
    stats, verdict = _run(scored, tmp_path / "f", semdedup_clusters=2, num_partitions=2,
                          report=False)
    every = read_dir(scored, "parquet")
    score = dict(zip(every.column("key").to_pylist(), every.column("pair_score").to_pylist()))
    want = set()
    for j, src in enumerate(DUP_IMAGES):   # of each image and its copy, the lower score goes
        a, b = f"{src:014d}", f"{N_BASE + j:014d}"
        want.add(min((a, b), key=lambda k: (score[k], -int(k))))
    assert {k for k, r in verdict.items() if r} == want
    assert all(verdict[k] == semdedup.RULE for k in want)
    assert stats["stages"]["filter"]["dropped"] == {semdedup.RULE: len(DUP_IMAGES)}
    assert stats["input_rows"] == stats["output_rows"] + sum(stats["dropped"].values())

    # score_min on the same real scores: exactly the rows under the threshold go (a threshold
    # that is one of the float32 scores, so no rounding decides a row)
    cut = sorted(score.values())[len(score) // 2]
    pipeline.run(FilterConfig(input=str(scored), output=str(tmp_path / "min"), score_min=cut,
                              disabled_rules=[r for r in RULES if r != "score_min"],
                              write_webdataset=False))
    dropped = read_dir(tmp_path / "min", "dropped", "0*.parquet")
    assert set(dropped.column("reason").to_pylist()) == {"score_min"}
    assert set(dropped.column("key").to_pylist()) == {k for k, v in score.items() if v < cut}
    assert set(read_dir(tmp_path / "min", "parquet").column("key").to_pylist()) == \
        {k for k, v in score.items() if v >= cut}
