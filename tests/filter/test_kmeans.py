"""SemDeDup's distributed spherical k-means (real local Ray): a pass over the blocks is exactly
one Lloyd step computed on one machine, it does not depend on the block layout, and the passes
improve on the sample's start."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data

from align_ray.filter import kmeans, semdedup

D, BLOBS, PER_BLOB = 16, 4, 150


def _rows() -> np.ndarray:
    """4 loose blobs of unit rows, in float16 as the score stage stores them."""
    rng = np.random.default_rng(7)
    centres = kmeans.unit(rng.normal(size=(BLOBS, D)))
    x = np.repeat(centres, PER_BLOB, axis=0) + 0.35 * rng.normal(size=(BLOBS * PER_BLOB, D))
    x = kmeans.unit(x[rng.permutation(len(x))])
    # what k-means sees of them: the float16 rows, unit again (semdedup.emb_rows)
    return semdedup.emb_rows(_table(x))


def _table(x: np.ndarray) -> pa.Table:
    return pa.table({"key_id": pa.array(np.arange(len(x)) * 7919 % 100_003, pa.int64()),
                     semdedup.EMB_COL: semdedup.packed(pa.FixedSizeListArray.from_arrays(
                         pa.array(x.ravel(), pa.float32()), D))})


def _dataset(x: np.ndarray, blocks: int) -> ray.data.Dataset:
    table = _table(x)
    cuts = np.linspace(0, len(x), blocks + 1).astype(int)
    return ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])])


def _lloyd(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
    """One spherical Lloyd step on one machine: the reference."""
    sims = x @ c.T
    near = sims.argmax(1)
    new = c.astype(np.float64).copy()
    for j in np.unique(near):
        new[j] = kmeans.unit(x[near == j].astype(np.float64).sum(0, keepdims=True))[0]
    return new, float(sims.max(1).mean())


def test_a_pass_is_one_lloyd_step_over_every_row(ray_cluster):
    x = _rows()
    start, fit0 = kmeans.fit(_dataset(x, 5), BLOBS, semdedup.emb_rows, 12, 0, 3)
    assert fit0 == {"clusters": BLOBS, "train_rows": fit0["train_rows"], "passes": 0,
                    "mean_cosine": []} and 0 < fit0["train_rows"] < len(x)
    one, fit1 = kmeans.fit(_dataset(x, 5), BLOBS, semdedup.emb_rows, 12, 1, 3)
    want, want_cos = _lloyd(x, start)
    np.testing.assert_allclose(one, want, atol=1e-6)
    assert fit1["passes"] == 1 and abs(fit1["mean_cosine"][0] - want_cos) < 1e-5


def test_passes_improve_on_the_sample_and_do_not_depend_on_blocks(ray_cluster):
    x = _rows()
    c7, fit7 = kmeans.fit(_dataset(x, 7), BLOBS, semdedup.emb_rows, 12, 50, 3)
    c1, fit1 = kmeans.fit(_dataset(x, 1), BLOBS, semdedup.emb_rows, 12, 50, 1)
    cos = fit7["mean_cosine"]
    assert 1 < fit7["passes"] < 50     # stopped early: nothing moved, or a pass gained little
    assert all(b >= a - 1e-6 for a, b in zip(cos, cos[1:])) and cos[-1] > cos[0] + 1e-3
    # the sample (by key hash) and the start are the same; the passes agree to rounding
    assert fit1["train_rows"] == fit7["train_rows"] and fit1["passes"] == fit7["passes"]
    np.testing.assert_allclose(c1, c7, atol=1e-6)
    assert (kmeans.nearest(x, c1)[0] == kmeans.nearest(x, c7)[0]).all()
