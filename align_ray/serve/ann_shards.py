"""Tuned ANN indexes for sharded serving: one faiss index per ``IndexShard``'s rows.

An index served with ``index_shards: N`` is split by rows (:func:`~align_ray.serve.shards.
row_range`).  The whole-index ANN file of :mod:`align_ray.serve.ann` cannot be split that way,
so ``align-ray index`` with ``ann.shards: N`` (N > 1) builds, per modality, N indexes of one
kind instead, index ``s`` over shard ``s``'s rows with ids local to it:

* the kind comes from :func:`~align_ray.serve.ann.plan` for one shard's rows, with
  ``memory_budget_mb`` divided by N (each shard is its own replica); ``auto`` stays exact
  when one shard's rows are below ``exact_below``;
* one ``nprobe`` / ``efSearch`` is tuned for all N on the *merged* result (each shard's top k,
  merged by score, as the Router does), against exact search over all rows, on held-out
  queries of the other modality.  So the recall in ``index.json`` is the recall a client gets.
  Tuning sweeps the same values as the unsharded build, without its latency budget and IVF
  fallback (those stay unsharded features).

``index.json`` gets an ``ann_shards`` section (kind, shards, per modality the files, setting
and recall), and its ``ann`` section says ``flat``: an unsharded app searches such an index
exactly.  An ``IndexShard`` of an app with ``index_shards`` equal to the section's ``shards``
memory-maps its own file (and copies only that one from S3); with another shard count it
searches its rows exactly, and ``/healthz`` says which.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from align_ray.serve import ann
from align_ray.serve.config import AnnConfig
from align_ray.serve.shards import merge, row_range

log = logging.getLogger("align_ray.serve.ann")
SECTION = "ann_shards"


def file_name(modality: str, shard: int, num_shards: int) -> str:
    return f"{modality}.shard{shard}of{num_shards}.faiss"


def _merged(indexes: list, n: int, queries: np.ndarray, k: int, value: int) -> np.ndarray:
    """The Router's answer: every shard's top ``k`` at ``value``, global ids, merged."""
    parts = []
    for s, index in enumerate(indexes):
        scores, ids = index.search(queries, k, params=ann.search_params(index, value))
        lo = row_range(s, len(indexes), n)[0]
        parts.append((scores, np.where(ids >= 0, ids + lo, -1)))
    return merge(parts, k)[1]


def build(out: str, manifest: dict[str, Any], cfg: AnnConfig,
          parts: int = 1) -> dict[str, Any] | None:
    """Per-shard index files in the local index dir ``out``; returns the ``ann_shards``
    section, or None when one shard's rows are searched exactly."""
    n, dim, num = int(manifest["count"]), int(manifest["dim"]), cfg.shards
    per_shard = dataclasses.replace(cfg, memory_budget_mb=cfg.memory_budget_mb / num)
    spec = ann.plan(-(-n // num), dim, per_shard)
    if spec is None:
        return None
    faiss = ann._faiss()
    rng = np.random.default_rng(cfg.seed)
    embs = {m: np.load(os.path.join(out, f"{m}_embeddings.npy"), mmap_mode="r")
            for m in manifest["modalities"]}
    section: dict[str, Any] = {"kind": spec, "shards": num, "k": cfg.k,
                               "target_recall": cfg.target_recall}
    for m, emb in embs.items():
        queries, truth = ann.recall_queries(embs, m, cfg, rng)
        t0 = time.perf_counter()
        indexes = []
        for s in range(num):
            lo, hi = row_range(s, num, n)
            rows = np.ascontiguousarray(emb[lo:hi], dtype=np.float32)
            indexes.append(ann._add(ann._train(spec, rows, rng), rows, parts))
        built = time.perf_counter() - t0
        tune_on, held = ann.halves(len(queries))
        value, r_tune = 0, 0.0
        for value in ann.candidates(indexes[0], cfg.k, cfg.max_ef):
            r_tune = ann.recall_at_k(_merged(indexes, n, queries[tune_on], cfg.k, value),
                                     truth[tune_on])
            if r_tune >= cfg.target_recall:
                break
        else:
            log.warning("ann: %s shards' merged recall@%d %.3f < target %.3f at the widest %s",
                        m, cfg.k, r_tune, cfg.target_recall, ann.param_name(indexes[0]))
        files = [file_name(m, s, num) for s in range(num)]
        for index, name in zip(indexes, files):
            ann.set_param(index, value)
            faiss.write_index(index, os.path.join(out, name))
        section[m] = {
            "files": files, "kind": spec, ann.param_name(indexes[0]): value,
            "recall_tuning": round(r_tune, 4),
            "recall": round(ann.recall_at_k(_merged(indexes, n, queries[held], cfg.k, value),
                                            truth[held]), 4),
            "queries": len(queries[held]), "build_s": round(built, 2),
            "bytes": sum(os.path.getsize(os.path.join(out, f)) for f in files)}
        log.info("ann: %s, %d shards of %s, %s", m, num, spec, section[m])
    return section


def usable(manifest: dict[str, Any], num_shards: int) -> bool:
    """Whether the index holds per-shard ANN files for exactly ``num_shards`` shards."""
    return (manifest.get(SECTION) or {}).get("shards") == num_shards


def files_of(manifest: dict[str, Any], shard: int) -> list[str]:
    section = manifest[SECTION]
    return [section[m]["files"][shard] for m in manifest["modalities"] if m in section]


def load(local_dir: str, manifest: dict[str, Any], modality: str, shard: int):
    """Shard ``shard``'s ``modality`` index, memory-mapped, at its stored setting."""
    entry = manifest[SECTION][modality]
    index = ann._faiss().read_index(os.path.join(local_dir, entry["files"][shard]),
                                    ann.read_flags(True))
    ann.set_param(index, entry[ann.param_name(index)])
    return index


def info(manifest: dict[str, Any], num_shards: int, backend: str) -> dict[str, dict]:
    """``/healthz``'s search summary for a sharded index, per modality."""
    if backend == "auto" and usable(manifest, num_shards):
        section = manifest[SECTION]
        return {m: {"kind": f"{section[m]['kind']}, sharded",
                    **{k: section[m][k] for k in ("nprobe", "ef", "recall") if k in section[m]},
                    "recall_at": section["k"]} for m in manifest["modalities"]}
    kind = "faiss" if backend == "faiss" else "exact"
    return {m: {"kind": f"{kind}, sharded"} for m in manifest["modalities"]}
