"""Exact top-k, the faiss backend and hit de-duplication (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest

from align_ray.serve.search import VectorIndex, dedup_hits, hamming64, normalize, topk_exact


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(0)
    return normalize(rng.standard_normal((5000, 32)).astype(np.float32))


def _brute(emb, q, k):
    s = normalize(q) @ emb.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


@pytest.mark.parametrize("chunk", [None, 7, 1000, 4999])
def test_exact_matches_brute_force_across_chunkings(emb, chunk):
    q = np.random.default_rng(1).standard_normal((9, 32)).astype(np.float32)
    s, i = topk_exact(emb, normalize(q), 10, chunk_rows=chunk)
    bs, bi = _brute(emb, q, 10)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_few_queries_scan_equals_the_matrix_product_path(emb, b):
    """faiss's row scan (the candidates of a call with few queries) and the chunked matrix
    products give the same ids and the same scores, exact ties (duplicated rows) included."""
    pytest.importorskip("faiss")
    rows = emb.copy()
    rows[100:110] = rows[5]  # ten rows equal to row 5: a tie straddling the top-10 cut
    q = normalize(np.random.default_rng(4).standard_normal((b, 32)).astype(np.float32))
    q[0] = rows[5]
    for k in (1, 10, 30):
        ss, si = topk_exact(rows, q, k, scan=True)
        ms, mi = topk_exact(rows, q, k, scan=False)
        np.testing.assert_array_equal(si, mi)
        np.testing.assert_array_equal(ss, ms)
    assert si[0, :11].tolist() == [5, *range(100, 110)]  # the tie goes by id
    bs, bi = _brute(rows, q, 30)
    np.testing.assert_array_equal(si[:, :30][:, 11:], bi[:, 11:])


def test_k_larger_than_corpus_and_single_query(emb):
    idx = VectorIndex(emb[:5])
    s, i = idx.search(emb[3], 50)
    assert s.shape == (1, 5) and i[0, 0] == 3 and s[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sorted(i[0].tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="dimension"):
        idx.search(np.ones(31, np.float32), 3)


def test_faiss_flat_agrees_with_exact(emb):
    pytest.importorskip("faiss")
    q = np.random.default_rng(2).standard_normal((20, 32)).astype(np.float32)
    es, ei = VectorIndex(emb).search(q, 10)
    fs, fi = VectorIndex(emb, backend="faiss", faiss_factory="Flat").search(q, 10)
    np.testing.assert_array_equal(ei, fi)
    np.testing.assert_allclose(es, fs, atol=1e-5)


def test_faiss_hnsw_recall(emb):
    pytest.importorskip("faiss")
    q = np.random.default_rng(3).standard_normal((50, 32)).astype(np.float32)
    _, ei = VectorIndex(emb).search(q, 10)
    _, hi = VectorIndex(emb, backend="faiss", faiss_factory="HNSW32").search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ei, hi)])
    assert recall >= 0.9


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        VectorIndex(np.zeros((2, 2), np.float32), backend="annoy")


def test_hamming64():
    a = np.array([0, 1, 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    assert hamming64(a, 0).tolist() == [0, 1, 64]


def test_dedup_by_phash_and_text_hash():
    ids = np.array([4, 2, 0, 3, 1])                       # best first
    phash = np.array([0b0, 0b1111, 0b1, 0xFFFF0000, 0b11], dtype=np.uint64)  # by id
    keep = dedup_hits(ids, phash=phash, max_hamming=2)
    # id4 (0b11) kept; id2 (0b1: 1 bit away), id0 (0b0: 2 bits) dropped; id3 kept;
    # id1 (0b1111: 2 bits from 0b11) dropped
    assert ids[keep].tolist() == [4, 3]
    text_hash = np.array([7, 7, 8, 8, 9], dtype=np.uint64)     # by id: 4->9 2->8 0->7 3->8 1->7
    keep = dedup_hits(ids, text_hash=text_hash)
    assert ids[keep].tolist() == [4, 2, 0]
