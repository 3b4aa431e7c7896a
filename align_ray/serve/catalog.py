"""The Router's named indexes, and swapping them while it serves.

``user_config`` (the Router's, :meth:`ServeConfig.index_user_config`) is
``{"indexes": {name: path}, "default": name}``.  :meth:`Catalog.apply` loads what is new (an
unchanged path keeps its loaded copy) in a worker thread, warms the shards on it when the index
is sharded, and only then replaces the catalog in one assignment.  Until then every request is
answered from the old one; a request that already holds an entry finishes on it.  A load that
fails in a running replica is logged and reported by ``/healthz``, and the replica keeps
serving what it had (raising would make Serve restart a replica that serves fine).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from align_ray.serve.batcher import NaturalBatcher
from align_ray.serve.config import ServeConfig
from align_ray.serve.schemas import APIError
from align_ray.serve.store import IndexStore

log = logging.getLogger("ray.serve")


@dataclass
class Served:
    """One loaded index: its metadata (and vectors, unsharded) and the batcher searching it."""

    name: str
    path: str
    store: IndexStore
    searches: NaturalBatcher


class Catalog:
    def __init__(self, cfg: ServeConfig, shards: list):
        self.cfg, self.shards = cfg, list(shards)
        self.entries: dict[str, Served] = {}
        self.default: str | None = None
        self.last_error: str | None = None
        self.version = 0               # bumped by every swap (reported by /healthz)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str | None) -> Served:
        entries, default = self.entries, self.default
        if name is None:
            if default is None:
                raise APIError(404, "no index is loaded (start the server with --index)")
            return entries[default]
        got = entries.get(name)
        if got is None:
            raise APIError(404, f"unknown index {name!r}; this server has {list(entries)}")
        return got

    async def apply(self, user_config: dict[str, Any] | None) -> None:
        indexes = dict((user_config or {}).get("indexes") or {})
        default = (user_config or {}).get("default") or next(iter(indexes), None)
        try:
            if default is not None and default not in indexes:
                raise ValueError(f"default index {default!r} is not one of {list(indexes)}")
            by_path = {e.path: e for e in self.entries.values()}
            new: dict[str, Served] = {}
            for name, path in indexes.items():
                path = path if "://" in path else os.path.abspath(os.path.expanduser(path))
                old = by_path.get(path)
                new[name] = (Served(name, path, old.store, old.searches) if old
                             else await self._load(name, path))
        except Exception as e:
            if not self.entries and self.version == 0:
                raise                  # a replica that never served: fail its start
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("align-ray: index swap to %s failed; still serving %s", indexes,
                      {n: s.path for n, s in self.entries.items()}, exc_info=e)
            return
        # the switch: no await between these, so no request sees half of it
        self.entries, self.default = new, default
        self.version += 1
        self.last_error = None
        log.info("align-ray: serving indexes %s (default %s)", {n: s.path for n, s in new.items()},
                 default)

    async def _load(self, name: str, path: str) -> Served:
        cfg = self.cfg
        sharded = bool(self.shards)
        store = await asyncio.to_thread(IndexStore, path, cfg.backend, cfg.faiss_factory,
                                        cfg.dedup_hamming, True, not sharded)
        if sharded:
            from align_ray.serve.shards import ShardedSearch

            search = ShardedSearch(self.shards, path, store, cfg.router.call_timeout_s)
            await search.warm()
            return Served(name, path, store, NaturalBatcher(
                search.search_many, in_flight=cfg.index_shard.batches_in_flight()))
        return Served(name, path, store, NaturalBatcher(store.search_many))

    def info(self, served: Served) -> dict[str, Any]:
        from align_ray.serve import ann_shards

        store = served.store
        return {"name": served.name, "path": served.path, "count": len(store), "dim": store.dim,
                "modalities": list(store.modalities), "backend": self.cfg.backend,
                "shards": len(self.shards) or 1,
                "search": (store.search_info() if not self.shards else ann_shards.info(
                    store.manifest, len(self.shards), self.cfg.backend)),
                "search_batches": served.searches.batches, "searches": served.searches.items}
