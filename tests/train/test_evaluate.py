"""Retrieval and zero-shot metrics on tiny hand-computed examples (NumPy only, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from align_ray.train.evaluate import chance_recall, ranks, retrieval_metrics, zero_shot_classify

IMG = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], np.float32)
TXT = np.array([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], np.float32)
# S = IMG @ TXT.T = [[0.6, 0, 1], [0.8, 1, 0], [0.96, 0.6, 0.8]]


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_hand_computed_ranks(chunk):
    m = retrieval_metrics(IMG, TXT, chunk=chunk)
    i2t, t2i = m["image_to_text"], m["text_to_image"]
    # image ranks [2, 1, 2]; text ranks [3, 1, 2]
    assert i2t == {"R@1": pytest.approx(1 / 3), "R@5": 1.0, "R@10": 1.0,
                   "mean_rank": pytest.approx(5 / 3), "median_rank": 2.0}
    assert t2i == {"R@1": pytest.approx(1 / 3), "R@5": 1.0, "R@10": 1.0,
                   "mean_rank": pytest.approx(2.0), "median_rank": 2.0}
    assert m["n"] == 3


def test_shared_match_values_count_as_correct():
    m = retrieval_metrics(IMG, TXT, match=["a", "b", "a"], chunk=1)
    for d in ("image_to_text", "text_to_image"):
        assert m[d]["R@1"] == 1.0 and m[d]["mean_rank"] == 1.0


def test_ties_count_against_the_query():
    same = np.ones((4, 2), np.float32) / np.sqrt(2)
    m = retrieval_metrics(same, same)
    assert m["image_to_text"]["R@1"] == 0.0 and m["image_to_text"]["median_rank"] == 4.0


def test_chunked_equals_unchunked_on_a_larger_pool():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    codes = rng.integers(0, 50, 300)
    full = ranks(a, b, codes, codes, chunk=300)
    assert np.array_equal(full, ranks(a, b, codes, codes, chunk=7))
    # brute force for one query
    s = a[5].astype(np.float32) @ b.astype(np.float32).T
    best = s[codes == codes[5]].max()
    assert full[5] == 1 + np.sum((s >= best) & (codes != codes[5]))


def test_chance():
    c = chance_recall(np.arange(10))
    assert c == pytest.approx({"R@1": 0.1, "R@5": 0.5, "R@10": 1.0})
    # groups of two in a pool of 4: P(top-1 correct) = 2/4
    assert chance_recall(np.array([0, 0, 1, 1]))["R@1"] == pytest.approx(0.5)


class TableEmbedder:
    """A hand-written text embedder: fixed vectors per prompt (the function under test only needs
    ``embed_texts``/``embed_images``)."""

    TABLE = {"a cat": [1, 0], "cat": [0.6, 0.8], "a dog": [0, 1], "dog": [0, 1],
             "a car": [-1, 0], "car": [-1, 0]}

    def embed_texts(self, texts):
        return np.asarray([self.TABLE[t] for t in texts], np.float32)

    def embed_images(self, images):
        raise AssertionError("embeddings are passed in")


def test_zero_shot_averages_templates_then_normalises():
    img = np.array([[1, 0], [0.6, 0.8], [-1, 0]], np.float32)
    labels = ["cat", "dog", "car"]
    # class cat = normalise(mean([1,0],[0.6,0.8])) = [0.894, 0.447]; image 1 (a dog) scores
    # cat 0.894 > dog 0.8, so top-1 is 2/3, top-5 (all 3 classes) is 1.
    out = zero_shot_classify(TableEmbedder(), img, labels, templates=["a {}", "{}"])
    assert out["top1"] == pytest.approx(2 / 3) and out["top5"] == 1.0
    assert out["classes"] == 3 and out["n"] == 3
    # with one template only, image 1 is closest to dog
    assert zero_shot_classify(TableEmbedder(), img, labels, templates=["a {}"])["top1"] == 1.0


def test_shape_errors():
    with pytest.raises(ValueError):
        retrieval_metrics(IMG, TXT[:2])
    with pytest.raises(ValueError):
        retrieval_metrics(IMG, TXT, match=["a"])
