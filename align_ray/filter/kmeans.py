"""Spherical k-means over a Ray Dataset of embeddings (SemDeDup's clusters), run distributed.

    C0 = faiss k-means on a key-hash sample                    [one Ray task: the start]
    then up to ``passes`` Lloyd steps, each over every row:
      P = per block, each row's nearest centroid, and per cluster its row count, the sum of
          its unit rows (float64) and the sum of their cosines  [map_batches]
      S = per cluster, the blocks' partial sums added           [task shuffle on cluster]
      C = S / |S| (spherical k-means: the mean direction); a cluster no row chose keeps its
          centroid
    and it stops early once a pass gained less than ``GAIN`` in the rows' mean cosine to their
    centroid, or no centroid moved by more than ``TOL`` (1 - cosine).

Why the passes over every row, and not the sample alone: the sample bounds the one-task start,
but at the auto k (one cluster per ~10 k rows) a bounded sample leaves too few points per
centroid once the corpus is large (1.8 B rows: 180 k clusters from a 200 k sample, where faiss
itself asks for 39 or more per centroid).  Each pass averages all rows, in parallel, at the cost
of one assignment (n x k x d) and one shuffle of at most one row per cluster per block.

Reproducible: the start is faiss on a sample chosen by key hash, sorted, one thread, a fixed
seed; a pass sums in float64 and adds the blocks' partials in a fixed order (by the smallest
key of each block), so the same blocks give the same centroids bit for bit, and other block
layouts the same up to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import ray.data

from align_ray.filter.shuffle import map_groups, partition_ids

SEED = 1234
TOL = 1e-6  # largest centroid move (1 - cosine) that still counts as "moved"
# smallest gain in mean cosine worth another pass (each costs a full assignment); a start
# with thousands of sampled rows per centroid gains ~1e-4 in its first pass, one with a
# single row per centroid ~0.05 (BENCHMARKS.md, "SemDeDup's k-means")
GAIN = 1e-4


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


def sample(batch: pa.Table, rate: float, columns: list[str]) -> pa.Table:
    """A key-hash sample (the same rows whatever the blocks); 2**20 buckets."""
    pick = partition_ids(batch, ["key_id"], 1 << 20) < rate * (1 << 20)
    return batch.filter(pa.array(pick)).select(columns)


@ray.remote(num_cpus=1)
def start(k: int, rows_of, *parts: pa.Table) -> np.ndarray:
    """faiss spherical k-means (20 iterations) on the sample: the first centroids."""
    import faiss

    faiss.omp_set_num_threads(1)   # reproducible sums: one thread, fixed seed, sorted sample
    x = np.ascontiguousarray(rows_of(pa.concat_tables(parts).sort_by("key_id")))
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=SEED, spherical=True, verbose=False,
                      max_points_per_centroid=1 << 30)   # the sample is already the budget
    km.train(x)
    return km.centroids


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit row's nearest centroid (by inner product) and its cosine to it."""
    import faiss

    if not len(x):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    sims, idx = index.search(np.ascontiguousarray(x, np.float32), 1)
    return idx[:, 0].astype(np.int64), sims[:, 0]


_PARTIAL = ["cluster", "tag", "n", "cos", "sum"]


def _partial(batch: pa.Table, centroids: np.ndarray, rows_of) -> pa.Table:
    """One block's share of a Lloyd step: per cluster it touches, (n, sum of cosines, sum)."""
    x = rows_of(batch)
    idx, sims = nearest(x, centroids)
    clusters, inverse = np.unique(idx, return_inverse=True)
    sums = np.zeros((len(clusters), centroids.shape[1]), np.float64)
    np.add.at(sums, inverse, x.astype(np.float64))
    keys = batch.column("key_id").to_numpy()
    tag = int(keys.min()) if len(keys) else 0
    return pa.table([pa.array(clusters, pa.int64()), pa.array(np.full(len(clusters), tag)),
                     pa.array(np.bincount(inverse, minlength=len(clusters)).astype(np.int64)),
                     pa.array(np.bincount(inverse, sims.astype(np.float64),
                                          minlength=len(clusters))),
                     _binary(sums)], names=_PARTIAL)


def _binary(rows: np.ndarray) -> pa.Array:
    """float64 rows as fixed-size binary (the task shuffle carries no list columns)."""
    rows = np.ascontiguousarray(rows, np.float64)
    return pa.Array.from_buffers(pa.binary(rows.shape[1] * 8), len(rows),
                                 [None, pa.py_buffer(rows.tobytes())])


def _rows(col: pa.Array | pa.ChunkedArray, d: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    raw = np.frombuffer(arr.buffers()[1], np.float64)
    return raw[arr.offset * d:(arr.offset + len(arr)) * d].reshape(len(arr), d)


def _reduce(group: pa.Table, d: int) -> pa.Table:
    """One cluster: its blocks' partials added in the order of their tags."""
    group = group.sort_by("tag")   # a fixed order, so the same partials sum bit for bit
    total = _rows(group.column("sum"), d).sum(axis=0, keepdims=True)
    return pa.table([pa.array([group.column("cluster")[0].as_py()], pa.int64()),
                     pa.array([sum(group.column("n").to_pylist())], pa.int64()),
                     pa.array([float(np.sum(group.column("cos").to_numpy()))]),
                     _binary(total)], names=["cluster", "n", "cos", "sum"])


def lloyd_step(ds: ray.data.Dataset, centroids: np.ndarray, rows_of,
               num_partitions: int) -> tuple[np.ndarray, float, float]:
    """One pass over every row: (new centroids, mean cosine to the old ones, largest move)."""
    d = centroids.shape[1]
    partial = ds.map_batches(_partial, fn_kwargs={"centroids": centroids, "rows_of": rows_of},
                             batch_format="pyarrow", batch_size=None).materialize()
    parts = [t for t in ray.get(map_groups(partial, "cluster", _reduce, num_partitions,
                                           {"d": d})) if t.num_rows]
    new = np.array(centroids, np.float64)
    n = cos = 0.0
    if parts:
        sums = pa.concat_tables(parts)
        idx = sums.column("cluster").to_numpy()
        new[idx] = unit(_rows(sums.column("sum"), d))
        n = float(np.sum(sums.column("n").to_numpy()))
        cos = float(np.sum(sums.column("cos").to_numpy()))
    new = new.astype(np.float32)
    moved = 1.0 - np.sum(unit(np.asarray(centroids, np.float64)) * unit(new.astype(np.float64)),
                         axis=1)
    return new, cos / n if n else 0.0, float(moved.max()) if len(moved) else 0.0


def fit(ds: ray.data.Dataset, k: int, rows_of, sample_rows: int, passes: int,
        num_partitions: int) -> tuple[np.ndarray, dict]:
    """Centroids for the rows of ``ds`` (``key_id`` + what ``rows_of(table)`` turns into unit
    float32 rows), and what the fit did: the sample size, the passes run, and the mean cosine
    of the rows to their centroid before each pass."""
    rows = ds.count()
    rate = min(1.0, sample_rows / max(1, rows))
    picked = ds.map_batches(sample, fn_kwargs={"rate": rate, "columns": ds.columns()},
                            batch_format="pyarrow", batch_size=None).materialize()
    if picked.count() == 0:   # a tiny rate missed every row: take them all
        picked = ds.materialize()
    n_sample = picked.count()
    k = max(1, min(k, n_sample))
    centroids = ray.get(start.remote(k, rows_of, *picked.to_arrow_refs()))
    history: list[float] = []
    for _ in range(passes):
        centroids, mean_cos, moved = lloyd_step(ds, centroids, rows_of, num_partitions)
        history.append(round(mean_cos, 6))
        if moved <= TOL or (len(history) > 1 and history[-1] - history[-2] < GAIN):
            break
    return centroids, {"clusters": k, "train_rows": n_sample, "passes": len(history),
                       "mean_cosine": history}
