"""Top-k search over L2-normalised embeddings: exact (default) or faiss, one API.

Exact search is a float32 matrix product in row chunks with a per-chunk ``argpartition``, so memory
stays at ``queries x chunk`` scores whatever the corpus size; scores are inner products of unit
vectors (cosine).  For a few queries (``SCAN_MAX_QUERIES``; an interactive search is one) the
candidates come from faiss's ``knn`` scan instead, when faiss is installed: a matrix-vector
product in numpy's BLAS reads the rows at well under the memory bandwidth that faiss's SIMD
row scan reaches on one core, while for batches the BLAS-3 product wins (BENCHMARKS.md "Exact
search vs faiss at equal threads").  Either way the winners are rescored and ordered the same
way (:func:`_rescore`), so both give the same result.  The faiss backend (``faiss-cpu``,
optional) builds ``index_factory(dim, spec, METRIC_INNER_PRODUCT)``: ``Flat`` is exact,
``HNSW32`` / ``IVF..`` are approximate.

:func:`dedup_hits` drops near-identical hits (images within a pHash Hamming distance, texts with
the same normalised-text hash), keeping the best-scored of each group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BACKENDS = ("exact", "faiss")
TIE_MARGIN = 16
SCAN_MAX_QUERIES = 8  # up to this many queries a call: faiss's row scan for the candidates


def _faiss():
    """The faiss module, or None without it (``faiss-cpu`` is optional)."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return faiss


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def topk_exact(emb: np.ndarray, queries: np.ndarray, k: int, chunk_rows: int | None = None,
               scan: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B,k], ids [B,k]) by descending inner product; ``k`` is capped at len(emb).
    ``scan``: candidates from faiss's row scan (None = when faiss is installed and there are at
    most ``SCAN_MAX_QUERIES`` queries), else from chunked matrix products."""
    n = emb.shape[0]
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, emb.shape[1])
    k = min(k, n)
    b = q.shape[0]
    if k <= 0:
        return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64)
    want, k = k, min(n, k + TIE_MARGIN)  # candidates past the cut, so ties there go by id too
    faiss = _faiss() if scan is not False and (scan or b <= SCAN_MAX_QUERIES) else None
    if faiss is not None and emb.dtype == np.float32 and emb.flags.c_contiguous:
        return _rescore(emb, q, _scan_candidates(faiss, emb, q, k), want)
    if chunk_rows is None:  # ~64 MB of scores per chunk, at least 64k rows
        chunk_rows = max(65536, (16 << 20) // max(b, 1))
    cand_s, cand_i = [], []
    for start in range(0, n, chunk_rows):
        block = emb[start:start + chunk_rows]
        scores = q @ block.T                                       # [B, C]
        kk = min(k, scores.shape[1])
        part = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]
        cand_s.append(np.take_along_axis(scores, part, axis=1))
        cand_i.append(part + start)
    s = np.concatenate(cand_s, axis=1)
    i = np.concatenate(cand_i, axis=1)
    if s.shape[1] > k:
        part = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
        s, i = np.take_along_axis(s, part, axis=1), np.take_along_axis(i, part, axis=1)
    return _rescore(emb, q, i, want)


def _scan_candidates(faiss, emb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """faiss's brute-force ``knn`` over the rows as they are (no index built, no copy): ids
    [B, k].  At most one OpenMP thread per query: faiss splits a call over its queries, and a
    single query's scan split over 2 threads ran 2.6x slower than on one (BENCHMARKS.md "Exact
    search vs faiss").  omp_set_num_threads is per calling thread in OpenMP, so concurrent
    searches in other threads keep their own setting."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(q.shape[0], threads)))
    try:
        _, ids = faiss.knn(q, emb, k, metric=faiss.METRIC_INNER_PRODUCT)
    finally:
        faiss.omp_set_num_threads(threads)
    return ids.astype(np.int64)


def _rescore(emb: np.ndarray, q: np.ndarray, i: np.ndarray, want: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The first pass's candidates ``i`` [B, k + margin] -> the ``want`` best, rescored.

    The scores are recomputed row by row for the candidates: a BLAS product's rounding (or
    faiss's SIMD sum's) depends on the matrix shapes (how many rows, how many queries in the
    batch), so the same pair could score 1 ulp apart in a sharded index or another batch.  An
    elementwise product summed over D is the same float for a pair whatever else is searched
    with it; ties are broken by id.  The first pass keeps TIE_MARGIN more candidates than asked
    for, because which of several equal (or 1-ulp apart) rows makes the cut there also depends
    on those shapes.  Costs (k + TIE_MARGIN) x D per query."""
    s = (emb[i] * q[:, None, :]).sum(-1, dtype=np.float32)
    order = np.lexsort((i, -s), axis=-1)[:, :want]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1).astype(np.int64)


class VectorIndex:
    """Search over one modality's embeddings ``[N, D]`` (rows are unit vectors), exact or
    through a faiss index: built here from ``faiss_factory`` (backend ``faiss``) or ``prebuilt``
    (the tuned ANN index ``align-ray index`` stored, :mod:`align_ray.serve.ann`)."""

    def __init__(self, emb: np.ndarray, backend: str = "exact", faiss_factory: str = "Flat",
                 hnsw_ef_search: int = 128, ivf_nprobe: int = 16, prebuilt: Any = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        # exact search reads the (possibly memory-mapped) rows as they are
        self.emb = emb if emb.dtype == np.float32 else np.asarray(emb, dtype=np.float32)
        if self.emb.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {self.emb.shape}")
        self.backend = backend
        self._faiss = prebuilt
        if backend == "faiss" and prebuilt is None:
            self._faiss = _build_faiss(np.ascontiguousarray(self.emb), faiss_factory,
                                       hnsw_ef_search, ivf_nprobe)

    def __len__(self) -> int:
        return self.emb.shape[0]

    @property
    def dim(self) -> int:
        return self.emb.shape[1]

    @property
    def approximate(self) -> bool:
        return self._faiss is not None

    def search(self, queries: np.ndarray, k: int,
               knobs: tuple[int | None, int | None] = (None, None)) -> tuple[np.ndarray, np.ndarray]:
        """Unit-normalises ``queries`` ([D] or [B,D]); returns (scores [B,k'], ids [B,k'])
        sorted by descending score, ``k' = min(k, N)``.  ``knobs`` = a request's own
        ``(nprobe, ef)``; the one the faiss index has applies, exact search ignores both."""
        q = normalize(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.dim}")
        if self._faiss is None:
            return topk_exact(self.emb, q, k)
        from align_ray.serve import ann

        k = min(k, len(self))
        value = knobs[1] if ann.param_name(self._faiss) == "ef" else knobs[0]
        scores, ids = self._faiss.search(q, k, params=ann.search_params(self._faiss, value))
        return scores.astype(np.float32), ids.astype(np.int64)


def _build_faiss(emb: np.ndarray, spec: str, ef_search: int, nprobe: int):
    faiss = _faiss()
    if faiss is None:  # pragma: no cover - depends on the environment
        raise RuntimeError("backend 'faiss' needs the faiss-cpu (or faiss-gpu) package")
    index = faiss.index_factory(emb.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(emb)
    index.add(emb)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, 16)
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except (RuntimeError, AttributeError):
        pass
    return index


def hamming64(a: np.ndarray, b: int) -> np.ndarray:
    """Bit distance between each uint64 in ``a`` and ``b``."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.uint64(b))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def dedup_hits(ids: np.ndarray, *, phash: np.ndarray | None = None,
               text_hash: np.ndarray | None = None, max_hamming: int = 6) -> np.ndarray:
    """Positions in ``ids`` (already sorted best-first) to keep: a hit is dropped when its pHash
    is within ``max_hamming`` bits of a kept hit's (if ``phash`` is given, indexed by id) or its
    text hash equals a kept hit's (if ``text_hash`` is given)."""
    keep: list[int] = []
    kept_ph: list[int] = []
    seen_text: set[int] = set()
    for pos, i in enumerate(np.asarray(ids, dtype=np.int64)):
        if text_hash is not None:
            th = int(text_hash[i])
            if th in seen_text:
                continue
        if phash is not None and kept_ph:
            if int(hamming64(np.array(kept_ph, dtype=np.uint64), int(phash[i])).min()) <= max_hamming:
                continue
        keep.append(pos)
        if text_hash is not None:
            seen_text.add(int(text_hash[i]))
        if phash is not None:
            kept_ph.append(int(phash[i]))
    return np.array(keep, dtype=np.int64)
