"""SemDeDup (Abbas et al. 2023): semantic deduplication on the score stage's image embeddings.

Runs after the plan's verdicts (so only rows every other rule kept take part, and a row another
rule drops keeps that reason), before the per-shard writer:

    E  = key_id, image_embedding, pair_score of every row      [read_parquet, own columns]
    E' = E joined with the verdicts that keep the row          [task shuffle on key_id]
    C  = spherical k-means centroids of E': faiss on a sample,
         then Lloyd passes over every row                      [kmeans.py: tasks + shuffles]
    A  = E' + the nearest centroid of each row                 [map_batches, faiss IndexFlatIP]
    D  = per cluster, the greedy rule below                    [map_groups: one cluster, one task]
    V' = V left-joined with D (reason semantic_duplicate)      [task shuffle on key_id]

Within a cluster (:func:`cluster_drops`): rows are visited best first by (pair_score
descending, key ascending); a row is dropped when its cosine to an already *kept* row of the
cluster is above ``1 - semdedup_eps`` (``eps`` is a cosine *distance*, as in the paper), else
it is kept.  So of a group of near-duplicates the highest-scoring pair survives.  This step is
exact (every pair of the cluster is compared) and a pure function of the cluster's rows, so it
does not depend on the block layout.  What is approximate is k-means itself: near-duplicates
that fall into different clusters are not compared (the paper's trade-off).

The centroids are reproducible too (:mod:`align_ray.filter.kmeans`: a key-hash sample,
single-threaded faiss with a fixed seed, then passes that add their float64 sums in a fixed
order).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from align_ray import ray_env
from align_ray.data.errors import InputError
from align_ray.filter import kmeans
from align_ray.filter.config import FilterConfig
from align_ray.filter.shuffle import Agg, aggregate, join, map_groups
from align_ray.layout import PARQUET, Layout

RULE = "semantic_duplicate"
EMB_COL, SCORE_COL = "image_embedding", "pair_score"
ROWS_PER_CLUSTER = 10_000   # auto k: the paper's 50 k clusters on LAION-440M are ~8.8 k rows each
_DROPS = pa.schema([("key_id", pa.int64()), ("sem_detail", pa.string())])


def _files(src: Layout, shards: list[dict]) -> list[str]:
    return [src.path(p) for m in shards for p in m["parts"] if p.startswith(f"{PARQUET}/")]


def check_columns(uri: str, names: list[str]) -> None:
    """Fail before any work when the input (columns ``names``) has not been through ``align-ray
    score``."""
    missing = [c for c in (EMB_COL, SCORE_COL) if c not in names]
    if missing:
        raise InputError(f"{uri} has no {' / '.join(missing)} column(s), which semdedup "
                         "needs: run `align-ray score` on it first and filter its output")


def packed(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A list column of embeddings -> fixed-size binary of their float16 bytes (pyarrow's
    hash join cannot carry list columns; this is also the score stage's own precision)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float16)
    width = 2 * (len(flat) // max(1, len(arr)))
    return pa.Array.from_buffers(pa.binary(max(width, 2)), len(arr),
                                 [None, pa.py_buffer(flat.tobytes())])


def unit_rows(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A (fixed-size) list or :func:`packed` column of embeddings -> float32 unit rows."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if pa.types.is_fixed_size_binary(arr.type):
        w = arr.type.byte_width
        raw = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * w:(arr.offset + n) * w]
        flat = raw.view(np.float16).astype(np.float32)
    else:
        flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float32)
    emb = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norm > 0, norm, 1)


def cluster_drops(key_id: np.ndarray, score: np.ndarray, emb: np.ndarray,
                  eps: float) -> dict[int, tuple[int, float]]:
    """The within-cluster rule on one cluster: {dropped key: (kept key it duplicates, cosine)}.
    ``emb`` rows must be unit length; a NaN score ranks last."""
    score = np.nan_to_num(np.asarray(score, np.float32), nan=-np.inf)
    order = np.lexsort((key_id, -score))
    kept = np.zeros((len(order), emb.shape[1] if emb.ndim == 2 else 0), np.float32)
    kept_key: list[int] = []
    limit = np.float32(1.0 - eps)
    out: dict[int, tuple[int, float]] = {}
    for i in order:
        if kept_key:
            sims = kept[:len(kept_key)] @ emb[i]
            j = int(np.argmax(sims))
            if sims[j] > limit:
                out[int(key_id[i])] = (kept_key[j], float(sims[j]))
                continue
        kept[len(kept_key)] = emb[i]
        kept_key.append(int(key_id[i]))
    return out


def _dedup_group(group: pa.Table, eps: float) -> pa.Table:
    keys = np.asarray(group.column("key_id").to_numpy(zero_copy_only=False), np.int64)
    drops = cluster_drops(keys, group.column(SCORE_COL).to_numpy(zero_copy_only=False),
                          unit_rows(group.column(EMB_COL)), eps)
    cluster = int(group.column("cluster")[0].as_py())
    return pa.table({"key_id": pa.array(list(drops), pa.int64()), "sem_detail": pa.array(
        [f"image cosine {c:.4f} > {1 - eps:.4f} to key {k:014d} (higher pair_score) in "
         f"cluster {cluster} of {len(keys)} rows" for k, c in drops.values()], pa.string())},
        schema=_DROPS)


def _typed(table: pa.Table) -> pa.Table:
    """map_groups gives a column-less table for a partition without clusters."""
    return table if table.num_columns else _DROPS.empty_table()


_typed_task = ray.remote(_typed)


def _as_key_id(batch: pa.Table) -> pa.Table:
    key = batch.column("key")
    key_id = key if pa.types.is_integer(key.type) else pc.cast(key, pa.int64())
    return pa.table({"key_id": key_id.cast(pa.int64()), SCORE_COL: batch.column(SCORE_COL)
                     .cast(pa.float32()), EMB_COL: packed(batch.column(EMB_COL))})


def emb_rows(table: pa.Table) -> np.ndarray:
    """k-means' view of a row: its image embedding as a float32 unit row."""
    return unit_rows(table.column(EMB_COL))


def _assign(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    nearest, _ = kmeans.nearest(emb_rows(batch), centroids)
    return batch.append_column("cluster", pa.array(nearest))


def _verdict(batch: pa.Table) -> pa.Table:
    sem = batch.column("sem_detail")
    hit = pc.is_valid(sem)
    reason = pc.if_else(hit, pa.scalar(RULE), batch.column("reason"))
    detail = pc.if_else(hit, sem, batch.column("detail"))
    out = batch.drop_columns(["sem_detail", "reason", "detail"])
    return out.append_column("reason", reason).append_column("detail", detail)


def clusters_for(cfg: FilterConfig, rows: int) -> int:
    """k: the configured one, else one cluster per ~10 k rows (at most one per sampled row:
    :func:`kmeans.fit`)."""
    return max(1, cfg.semdedup_clusters or math.ceil(rows / ROWS_PER_CLUSTER))


def size_summary(sizes: list[int], k: int) -> dict:
    """Cluster sizes for the report: count, max, median, mean and a log2 histogram."""
    s = np.asarray(sorted(sizes), np.int64)
    hist: dict[str, int] = {}
    for v in s:
        lo = 1 << int(math.log2(v))
        label = f"{lo}-{2 * lo - 1}"
        hist[label] = hist.get(label, 0) + 1
    return {"clusters": k, "nonempty": len(s), "rows": int(s.sum()) if len(s) else 0,
            "max": int(s.max()) if len(s) else 0,
            "median": float(np.median(s)) if len(s) else 0.0,
            "mean": round(float(s.mean()), 2) if len(s) else 0.0, "size_histogram": hist}


def apply(src: Layout, shards: list[dict], verdicts: ray.data.Dataset, cfg: FilterConfig,
          npart: int) -> tuple[ray.data.Dataset, dict]:
    """The verdicts with SemDeDup's drops added, and the report's summary."""
    emb = ray_env.read_parquet(_files(src, shards), filesystem=src.fs,
                               columns=["key", SCORE_COL, EMB_COL]).map_batches(
        _as_key_id, batch_format="pyarrow", batch_size=None)
    live = join(emb, verdicts.select_columns(["key_id", "reason"]), ["key_id"], "inner", npart,
                right_where=pc.field("reason").is_null(), drop=["reason"])
    rows = live.count()
    if rows == 0:
        return verdicts, {**size_summary([], 0), "eps": cfg.semdedup_eps, "dropped": 0}
    centroids, fit = kmeans.fit(live, clusters_for(cfg, rows), emb_rows, cfg.semdedup_train_rows,
                                cfg.semdedup_kmeans_passes, npart)
    assigned = live.map_batches(_assign, fn_kwargs={"centroids": centroids},
                                batch_format="pyarrow", batch_size=None).materialize()
    sizes = aggregate(assigned.select_columns(["cluster"]), ["cluster"], [Agg("n", "count")],
                      npart)
    size_list = [n for b in sizes.iter_batches(batch_format="pyarrow", batch_size=None)
                 for n in b.column("n").to_pylist()]
    drops = ray.data.from_arrow_refs([_typed_task.remote(r) for r in map_groups(
        assigned, "cluster", _dedup_group, npart, {"eps": cfg.semdedup_eps})])
    n_drop = drops.count()
    out = join(verdicts, drops, ["key_id"], "left outer", npart).map_batches(
        _verdict, batch_format="pyarrow", batch_size=None)
    return out, {**size_summary(size_list, fit["clusters"]), "eps": cfg.semdedup_eps,
                 "kmeans": fit, "dropped": n_drop}
