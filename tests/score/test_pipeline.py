"""``align-ray score`` in process on the session's Ray: a data-stage dir of the dev-set slice
(one broken image) -> the stage layout with embeddings and pair scores; then resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.data.errors import InputError
from align_ray.layout import SAMPLE_COLUMNS, Layout
from align_ray.score import pipeline
from align_ray.score.config import ScoreConfig


def _cfg(model, input, output, **kw) -> ScoreConfig:
    return ScoreConfig(model=model, input=str(input), output=str(output), batch_size=8,
                       concurrency=1, num_cpus=1, **kw)


def _read(out, sub) -> pa.Table:
    files = sorted((out / sub).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


@pytest.fixture(scope="module")
def scored(ray_cluster, tiny_model, stage_in, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "scored"
    return out, pipeline.run(_cfg(tiny_model, stage_in, out))


def test_rows_accounted_columns_carried_broken_image_dropped(scored, stage_in, corpus):
    out, stats = scored
    n = len(corpus["rows"])
    assert (stats["input_rows"], stats["output_rows"], stats["dropped"]) == (
        n, n - 1, {"decode_error": 1})
    assert stats["complete"] and stats["shards"] == 3
    assert sorted(Layout(str(out)).markers()) == sorted(Layout(str(stage_in)).markers())
    kept = _read(out, "parquet")
    assert kept.num_rows == n - 1
    assert set(SAMPLE_COLUMNS) <= set(kept.column_names)
    assert kept.schema.field("image_embedding").type.value_type == pa.float16()
    assert kept.schema.field("pair_score").type == pa.float32()
    dropped = _read(out, "dropped")
    assert dropped.column("url").to_pylist() == ["http://example.invalid/broken"]
    assert dropped.column("reason").to_pylist() == ["decode_error"]
    assert "cannot decode" in dropped.column("detail")[0].as_py()
    assert "jpg" not in dropped.column_names and "sha256" in dropped.column_names


def test_pair_score_is_the_embedders_own_cosine(scored, embedder, corpus):
    out, _ = scored
    kept = _read(out, "parquet")
    by_url = {r["url"]: r for r in corpus["rows"]}
    rows = [by_url[u] for u in kept.column("url").to_pylist()]
    img = embedder.embed_images([r["image"] for r in rows])
    txt = embedder.embed_texts([r["text"] for r in rows])
    want = np.sum(img * txt, axis=1)
    score = kept.column("pair_score").to_numpy()
    np.testing.assert_allclose(score, want, atol=1e-4)
    assert np.ptp(want) > 0.1   # a constant score would pass a loose check by accident
    f16 = {c: np.stack(kept.column(c).to_numpy(zero_copy_only=False)).astype(np.float32)
           for c in ("image_embedding", "text_embedding")}
    np.testing.assert_allclose(f16["image_embedding"], img, atol=2e-3)
    np.testing.assert_allclose(np.sum(f16["image_embedding"] * f16["text_embedding"], 1),
                               score, atol=5e-3)


def test_rerun_skips_done_shards_and_redoes_a_missing_one(scored, tiny_model, stage_in):
    out, first = scored
    lay = Layout(str(out))
    names = sorted(lay.markers())
    lost = names[1]
    (out / "_shards" / f"{lost}.json").unlink()
    (out / "parquet" / f"{lost}.parquet").unlink()
    kept_mtimes = {s: (out / "_shards" / f"{s}.json").stat().st_mtime_ns
                   for s in names if s != lost}
    again = pipeline.run(_cfg(tiny_model, stage_in, out))
    assert again["shards_this_run"] == 1
    assert {s: (out / "_shards" / f"{s}.json").stat().st_mtime_ns
            for s in kept_mtimes} == kept_mtimes
    assert (out / "parquet" / f"{lost}.parquet").exists()
    for k in ("input_rows", "output_rows", "dropped", "complete"):
        assert again[k] == first[k]
    assert pipeline.run(_cfg(tiny_model, stage_in, out))["shards_this_run"] == 0
    with pytest.raises(InputError, match="another input"):
        pipeline.run(_cfg(tiny_model, stage_in, out, text_col="url"))
    assert json.loads((out / "stats.json").read_text())["complete"]


def test_cross_fitted_scores_come_from_the_model_that_did_not_see_the_fold(
        scored, tiny_model, stage_in, tmp_path):
    """fold_models: row r is scored by fold_models[caption_fold(text, K)].  The second model is
    the first with its text projection negated, so each row's score tells which one scored it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from align_ray.train.selection import caption_fold

    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_model, flipped)
    weights = load_file(str(flipped / "model.safetensors"))
    for k in ("text_proj.weight", "text_proj.bias"):
        weights[k] = -weights[k]
    save_file(weights, str(flipped / "model.safetensors"))

    out = tmp_path / "xfit"
    cfg = ScoreConfig(fold_models=[tiny_model, str(flipped)], input=str(stage_in),
                      output=str(out), batch_size=8, concurrency=1, num_cpus=1)
    stats = pipeline.run(cfg)
    assert stats["complete"] and stats["dropped"] == {"decode_error": 1}
    assert stats["model"] == [tiny_model, str(flipped)]
    one = {r["key"]: r["pair_score"] for r in _read(scored[0], "parquet").to_pylist()}
    two = _read(out, "parquet")
    folds = [caption_fold(t, 2) for t in two.column("text").to_pylist()]
    assert 0 < sum(folds) < len(folds)                  # both models scored some rows
    want = [one[k] * (1 if f == 0 else -1) for k, f in zip(two.column("key").to_pylist(), folds)]
    np.testing.assert_allclose(two.column("pair_score").to_numpy(), want, atol=1e-4)
    assert two.column("key").to_pylist() == sorted(two.column("key").to_pylist())  # row order
    with pytest.raises(ValueError, match="either model or fold_models"):
        ScoreConfig(model=tiny_model, fold_models=[tiny_model, str(flipped)])
