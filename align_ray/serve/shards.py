"""Sharded serving: an index split by rows over ``index_shards`` ``IndexShard`` deployments.

Shard ``s`` of ``N`` holds rows ``[s*n//N, (s+1)*n//N)`` of every modality of every index it is
asked about, and answers with global ids.  The Router (:class:`ShardedSearch`) sends a batch of
queries to all shards at once, merges their top-k by (score, id), and only then applies the
duplicate rule and attaches metadata, from the metadata-only store it holds, so the result is
the single index's result: exact search rescores its winners row by row
(:func:`~align_ray.serve.search.topk_exact`), so a pair has the same score in a shard as in the
whole index.

A shard loads an index the first time a request names its path (then keeps it; the least
recently used beyond ``keep`` are dropped), so a hot swap (the Router's ``reconfigure``) needs
no shard redeploy: the Router warms every shard on the new path before it switches over.
Each shard is its own deployment (``IndexShard0``, ``IndexShard1``, ...), autoscaled on its own.

Search inside a shard (``backend: auto``) uses the shard's own tuned ANN index when the index
was built with ``ann.shards`` equal to the app's ``index_shards``
(:mod:`align_ray.serve.ann_shards`), else it is exact; ``backend: faiss`` builds one per shard
from ``faiss_factory`` at load.  The whole-index ANN file serves only unsharded apps.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict

import numpy as np
from ray import serve

from align_ray.serve import replicas
from align_ray.serve.search import VectorIndex
from align_ray.serve.store import IndexStore, embeddings_file, localize, read_manifest


def row_range(shard: int, num_shards: int, count: int) -> tuple[int, int]:
    return shard * count // num_shards, (shard + 1) * count // num_shards


class ShardIndex:
    """Rows ``[lo, hi)`` of one index directory's vectors (memory-mapped), with global ids."""

    def __init__(self, index_dir: str, shard: int, num_shards: int, backend: str = "auto",
                 faiss_factory: str = "Flat"):
        from align_ray.serve import ann_shards

        manifest = read_manifest(index_dir)
        tuned = backend == "auto" and ann_shards.usable(manifest, num_shards)
        # the whole-index ANN file is of no use here; this shard's own one is (if built)
        local = localize(index_dir, manifest, ann=False,
                         extra=ann_shards.files_of(manifest, shard) if tuned else ())
        self.lo, self.hi = row_range(shard, num_shards, int(manifest["count"]))
        kind = "faiss" if backend == "faiss" or tuned else "exact"
        self.indexes: dict[str, VectorIndex] = {}
        for m in manifest["modalities"]:
            emb = np.load(os.path.join(local, embeddings_file(m)), mmap_mode="r")
            prebuilt = ann_shards.load(local, manifest, m, shard) if tuned else None
            self.indexes[m] = VectorIndex(emb[self.lo:self.hi], kind, faiss_factory,
                                          prebuilt=prebuilt)

    def search(self, queries: np.ndarray, modality: str, k: int,
               knobs: tuple = (None, None)) -> tuple[np.ndarray, np.ndarray]:
        index = self.indexes[modality]
        if len(index) == 0:                          # more shards than rows
            b = np.atleast_2d(queries).shape[0]
            return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64)
        scores, ids = index.search(queries, k, knobs)
        return scores, np.where(ids >= 0, ids + self.lo, -1)


@serve.deployment(name="IndexShard", health_check_period_s=10, graceful_shutdown_wait_loop_s=2,
                  graceful_shutdown_timeout_s=20)
class IndexShard:
    def __init__(self, shard: int, num_shards: int, backend: str = "auto",
                 faiss_factory: str = "Flat", keep: int = 4):
        self.shard, self.num_shards = shard, num_shards
        self.backend, self.faiss_factory, self.keep = backend, faiss_factory, keep
        self.loaded: OrderedDict[str, ShardIndex] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def _index(self, path: str) -> ShardIndex:
        got = self.loaded.get(path)
        if got is None:
            async with self._locks.setdefault(path, asyncio.Lock()):   # one load per path
                got = self.loaded.get(path)
                if got is None:
                    # in a thread: the replica keeps answering the paths it has meanwhile
                    got = await asyncio.to_thread(ShardIndex, path, self.shard, self.num_shards,
                                                  self.backend, self.faiss_factory)
                    self.loaded[path] = got
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(path)
        return got

    async def load(self, path: str) -> int:
        idx = await self._index(path)
        return idx.hi - idx.lo

    async def search(self, path: str, queries: np.ndarray, modality: str, k: int,
                     knobs: tuple = (None, None)) -> tuple[np.ndarray, np.ndarray]:
        idx = await self._index(path)
        return await asyncio.to_thread(idx.search, queries, modality, k, knobs)

    def ping(self) -> str:
        return "ok"


def merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The shards' (scores [B,k_s], ids [B,k_s]) -> the best ``k`` per query, by descending
    score, ties by id (as :func:`~align_ray.serve.search.topk_exact` orders them)."""
    scores = np.concatenate([s for s, _ in parts], axis=1).astype(np.float32)
    ids = np.concatenate([i for _, i in parts], axis=1).astype(np.int64)
    scores = np.where(ids >= 0, scores, -np.inf)     # faiss's -1 padding sorts last
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ShardedSearch:
    """``search_many`` (as :meth:`IndexStore.search_many`) over the shards of one index path;
    ``store`` is the Router's metadata-only copy of that index."""

    def __init__(self, shards: list, path: str, store: IndexStore, timeout_s: float = 30.0):
        self.shards, self.path, self.store = shards, path, store
        self.timeout_s = timeout_s

    async def warm(self) -> int:
        """Every shard loads this path (one replica each; others load on their first query)."""
        rows = await asyncio.gather(*(h.load.remote(self.path) for h in self.shards))
        if sum(rows) != len(self.store):
            raise RuntimeError(f"{self.path}: the shards hold {sum(rows)} rows, the index "
                               f"{len(self.store)}")
        return sum(rows)

    async def _top(self, queries: np.ndarray, modality: str, k: int, knobs: tuple):
        parts = await asyncio.gather(*(
            replicas.call(h.search, self.path, queries, modality, k, knobs, what=f"index shard {i}",
                          timeout_s=self.timeout_s) for i, h in enumerate(self.shards)))
        return merge(parts, k)

    async def search_many(self, queries: list[tuple]) -> list[list[dict]]:
        n, store = len(self.store), self.store
        out: list[list[dict] | None] = [None] * len(queries)

        def knobs_of(q):
            return tuple(q[4]) if len(q) > 4 else (None, None)

        for modality, knobs in {(q[1], knobs_of(q)) for q in queries}:
            pos = [i for i, q in enumerate(queries) if q[1] == modality and knobs_of(q) == knobs]
            fetch = max(store.fetch_size(queries[i][2], queries[i][3], n) for i in pos)
            scores, ids = await self._top(np.stack([queries[i][0] for i in pos]), modality,
                                          fetch, knobs)
            for row, i in enumerate(pos):
                query, _, k, dedup = queries[i][:4]
                hits, wide, s, d = None, fetch, scores[row], ids[row]
                while True:       # dedup may eat too many: widen this query alone, as unsharded
                    hits = store.finish(s, d, modality, k, dedup)
                    if len(hits) >= k or wide >= n:
                        break
                    wide = min(wide * 4, n)
                    s, d = (a[0] for a in await self._top(query[None], modality, wide, knobs))
                out[i] = hits
        return out  # type: ignore[return-value]
