"""Approximate nearest-neighbour indexes chosen for a memory budget, with their recall measured
(autofaiss's idea, on Ray).

:func:`plan` picks a faiss factory string from the corpus size, the dimension and the budget:

* below ``exact_below`` rows: no ANN index at all; exact search (a matrix product) is fast
  enough there and has recall 1;
* above it: ``HNSW32`` over the chosen codes (best latency at a given recall on CPUs) when
  codes plus HNSW's links (about 256 bytes per vector) fit ``memory_budget_mb``; else
  ``IVF{nlist}`` over the codes, with ``nlist`` about 4·sqrt(N);
* codes: float32 (``Flat``), ``SQfp16``, ``SQ8`` or ``PQ{m}x8``: the widest that fits the budget
  (``quantization`` forces one).

:func:`build` trains on a sample in the driver, adds the vectors (IVF: in parallel Ray tasks, one
part each, merged with ``merge_from``; HNSW: one process, faiss's own threads), then measures
recall@k against exact search on held-out queries: the *other* modality's embeddings (text
queries for the image index and the reverse), which is how the index is used.  It sweeps
``nprobe`` (IVF) or ``efSearch`` (HNSW) upwards and stores the smallest setting that reaches
``target_recall``, with the recall and latency it measured, in ``index.json``.  When ``auto``'s
HNSW misses the target at the widest efSearch, that modality's IVF index is built and tuned too,
and the one with the higher recall is kept.  Serving memory-maps the files and uses the stored
settings; a request may pass its own ``nprobe`` / ``ef``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import numpy as np

from align_ray.serve.config import AnnConfig
from align_ray.serve.search import topk_exact

log = logging.getLogger(__name__)
HNSW_LINK_BYTES = 32 * 2 * 4       # M=32: ~2M int32 neighbour ids per vector on level 0
CODES = {"none": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}
LATENCY_QUERIES = 20               # single queries timed per setting (their median)


def index_file(modality: str) -> str:
    return f"{modality}.faiss"


def _code_bytes(codes: str, dim: int) -> float:
    if codes == "Flat":
        return 4 * dim
    if codes == "SQfp16":
        return 2 * dim
    if codes == "SQ8":
        return dim
    return int(codes[2:].split("x")[0])           # PQ{m}x8: m bytes


def _pq(dim: int, max_bytes: float) -> str:
    """The largest PQ code (m sub-quantisers of 8 bits, m dividing dim) within ``max_bytes``."""
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if m <= max_bytes and dim % m == 0 and m <= dim:
            return f"PQ{m}x8"
    raise ValueError(f"no PQ code of dimension {dim} fits {max_bytes:.0f} bytes per vector")


def plan(n: int, dim: int, cfg: AnnConfig) -> str | None:
    """The faiss factory string for ``n`` vectors of ``dim`` under ``cfg``; None = exact search."""
    if cfg.kind == "flat" or (cfg.kind == "auto" and n < cfg.exact_below):
        return None
    budget = cfg.memory_budget_mb * 2**20 / n if cfg.memory_budget_mb > 0 else math.inf
    nlist = int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))

    def codes_for(extra: float) -> str | None:
        if cfg.quantization in CODES:
            c = CODES[cfg.quantization]
            return c if _code_bytes(c, dim) + extra <= budget else None
        if cfg.quantization == "pq":
            return _pq(dim, min(budget - extra, dim / 4)) if budget - extra >= 4 else None
        for c in ("Flat", "SQfp16", "SQ8"):
            if _code_bytes(c, dim) + extra <= budget:
                return c
        return _pq(dim, budget - extra) if budget - extra >= 4 else None

    if cfg.kind in ("auto", "hnsw"):
        codes = codes_for(HNSW_LINK_BYTES)
        if codes is not None and not codes.startswith("PQ"):   # PQ codes: IVF, below
            return "HNSW32" + ("" if codes == "Flat" else f",{codes}")
        if cfg.kind == "hnsw":
            raise ValueError(f"HNSW does not fit {cfg.memory_budget_mb} MB for {n} vectors")
    codes = codes_for(8)                                  # IVF stores an 8-byte id per vector
    if codes is None:
        raise ValueError(f"{n} vectors of dimension {dim} do not fit {cfg.memory_budget_mb} MB "
                         "even as 4-byte PQ codes")
    return f"IVF{nlist},{codes}"


def _faiss():
    import faiss

    return faiss


def _empty(spec: str, dim: int):
    """The untrained ``spec`` index.  faiss's factory turns on polysemous training for PQ codes
    (a slow annealing of the code order, 10x the k-means time on a small sample); it only serves
    polysemous (Hamming-filtered) search, which we never enable, so it is turned off."""
    faiss = _faiss()
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if hasattr(index, "do_polysemous_training"):      # IVF..,PQ.. and PQ.. (downcast types)
        index.do_polysemous_training = False
    return index


def _train(spec: str, emb: np.ndarray, rng: np.random.Generator):
    """The empty index, trained on a sample of ``emb``: in a Ray task when Ray is up (the
    driver of ``align-ray index`` may sit on a CPU-0 head), else here."""
    faiss = _faiss()
    index = _empty(spec, emb.shape[1])
    if index.is_trained:
        return index
    nlist = faiss.extract_index_ivf(index).nlist if spec.startswith("IVF") else 0
    size = min(len(emb), max(50_000, 64 * nlist))   # faiss warns below 39 points per list
    sample = emb[np.sort(rng.choice(len(emb), size, replace=False))] if size < len(emb) else emb
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    import ray

    if not ray.is_initialized():
        return faiss.deserialize_index(_train_sample(spec, sample))
    task = ray.remote(num_cpus=1)(_train_sample)
    return faiss.deserialize_index(ray.get(task.remote(spec, ray.put(sample))))


def _train_sample(spec: str, sample: np.ndarray) -> np.ndarray:
    """A Ray task: the empty ``spec`` index trained on ``sample``, serialized."""
    faiss = _faiss()
    index = _empty(spec, sample.shape[1])
    index.train(sample)
    return faiss.serialize_index(index)


def _add_part(trained: np.ndarray, vectors: np.ndarray, start: int) -> np.ndarray:
    """A Ray task: the trained empty index with ``vectors`` added (ids from ``start``)."""
    faiss = _faiss()
    index = faiss.deserialize_index(trained)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                       np.arange(start, start + len(vectors), dtype=np.int64))
    return faiss.serialize_index(index)


def _add(index, emb: np.ndarray, parts: int):
    """Add every vector; IVF indexes in ``parts`` parallel Ray tasks, merged in id order."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexIVF) or parts <= 1 or len(emb) < 2 * parts:
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        return index
    import ray

    trained = ray.put(faiss.serialize_index(index))
    task = ray.remote(num_cpus=1)(_add_part)
    bounds = np.linspace(0, len(emb), parts + 1).astype(int)
    refs = [task.remote(trained, ray.put(np.asarray(emb[a:b])), int(a))
            for a, b in zip(bounds[:-1], bounds[1:])]
    merged = faiss.deserialize_index(ray.get(refs[0]))
    for ref in refs[1:]:
        merged.merge_from(faiss.deserialize_index(ray.get(ref)), 0)
    return merged


def set_param(index, value: int) -> None:
    faiss = _faiss()
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(value)
    else:
        faiss.extract_index_ivf(index).nprobe = int(value)


def search_params(index, value: int | None):
    """Per-call faiss search parameters (thread-safe, unlike setting the index's own)."""
    if value is None:
        return None
    faiss = _faiss()
    if hasattr(index, "hnsw"):
        return faiss.SearchParametersHNSW(efSearch=int(value))
    return faiss.SearchParametersIVF(nprobe=int(value))


def param_name(index) -> str:
    return "ef" if hasattr(index, "hnsw") else "nprobe"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def _single_query_ms(index, queries: np.ndarray, k: int) -> float:
    """The median time of one query searched alone (what one request waits), in ms."""
    times = []
    for q in queries[:LATENCY_QUERIES]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def candidates(index, k: int, max_ef: int = 1024) -> list[int]:
    """The efSearch (HNSW) or nprobe (IVF) values tuning tries, narrowest first."""
    if hasattr(index, "hnsw"):
        return [v for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
                if k <= v <= max_ef] or [max(k, max_ef)]
    nlist = _faiss().extract_index_ivf(index).nlist
    return sorted({min(nlist, 2 ** i) for i in range(0, int(math.log2(nlist)) + 1)} | {nlist})


def tune(index, queries: np.ndarray, truth: np.ndarray, target: float,
         max_query_ms: float = 0.0, max_ef: int = 1024) -> dict[str, Any]:
    """The smallest nprobe / efSearch reaching ``target`` recall@k on ``queries``.

    ``max_query_ms`` > 0 is a latency budget (autofaiss's ``max_index_query_time_ms``): a
    setting whose single query takes longer is not taken, so the widest one within the budget
    is kept when the target recall needs more, and the recorded recall says what it costs."""
    k = truth.shape[1]
    values = candidates(index, k, max_ef)
    best: dict[str, Any] = {}
    over_budget = False
    for v in values:
        set_param(index, v)
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        r = recall_at_k(ids, truth)
        one = _single_query_ms(index, queries, k)
        if max_query_ms > 0 and one > max_query_ms:
            over_budget = True
            if best:           # the previous setting fitted the budget: it stays
                break
        best = {param_name(index): v, "recall": round(r, 4), "ms_per_query_batched": round(ms, 4),
                "ms_per_query": round(one, 4)}
        if r >= target or over_budget:
            break
    if max_query_ms > 0:
        best["max_query_ms"] = max_query_ms
        best["within_latency_budget"] = best["ms_per_query"] <= max_query_ms
    if best["recall"] < target:
        why = (f"the latency budget of {max_query_ms} ms per query" if over_budget else
               f"the widest {param_name(index)}")
        log.warning("ann: recall@%d %.3f < target %.3f at %s", k, best["recall"], target, why)
    set_param(index, best[param_name(index)])
    return best


def recall_queries(embs: dict[str, np.ndarray], modality: str, cfg: AnnConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Queries for ``modality``'s index (a sample of the *other* modality's embeddings) and
    their exact top ``cfg.k`` ids."""
    emb = embs[modality]
    other = embs.get("text" if modality == "image" else "image", emb)
    q_ids = rng.choice(len(other), min(cfg.recall_queries, len(other)), replace=False)
    queries = np.ascontiguousarray(other[np.sort(q_ids)], dtype=np.float32)
    return queries, topk_exact(emb, queries, cfg.k)[1]


def halves(n: int) -> tuple[slice, slice]:
    """(tuning, held-out) halves of ``n`` queries: a setting chosen to pass on the tuning half
    would flatter itself there."""
    return (slice(0, None, 2), slice(1, None, 2)) if n > 1 else (slice(None), slice(None))


def build(out: str, manifest: dict[str, Any], cfg: AnnConfig, parts: int = 1) -> dict[str, Any]:
    """ANN index files next to the embeddings in the local index dir ``out``; returns the
    ``index.json`` section describing them (``{"kind": "flat"}`` when exact search is chosen)."""
    n, dim = int(manifest["count"]), int(manifest["dim"])
    spec = plan(n, dim, cfg)
    if spec is None:
        return {"kind": "flat", "recall_at_k": 1.0}
    faiss = _faiss()
    rng = np.random.default_rng(cfg.seed)
    embs = {m: np.load(os.path.join(out, f"{m}_embeddings.npy"), mmap_mode="r")
            for m in manifest["modalities"]}
    section: dict[str, Any] = {"kind": spec, "k": cfg.k, "target_recall": cfg.target_recall}
    # auto's second choice, tried when its HNSW misses the target recall at the widest efSearch
    # (vectors packed into tight clusters defeat a graph search; IVF probes whole clusters)
    fallback = None
    if cfg.kind == "auto" and spec.startswith("HNSW"):
        try:
            fallback = plan(n, dim, dataclasses.replace(cfg, kind="ivf"))
        except ValueError as e:              # IVF does not fit the budget either
            log.info("ann: no IVF index to fall back on: %s", e)
    for m, emb in embs.items():
        queries, truth = recall_queries(embs, m, cfg, rng)
        chosen, index, entry = spec, *_build_tuned(spec, emb, queries, truth, cfg, parts, rng)
        if fallback and entry["recall_tuning"] < cfg.target_recall:
            log.warning("ann: %s index %s reaches recall@%d %.3f < %.3f at the widest efSearch; "
                        "trying %s", m, spec, cfg.k, entry["recall_tuning"], cfg.target_recall,
                        fallback)
            alt_index, alt = _build_tuned(fallback, emb, queries, truth, cfg, parts, rng)
            if alt["recall_tuning"] > entry["recall_tuning"]:
                alt["instead_of"] = {"kind": spec, **entry}
                chosen, index, entry = fallback, alt_index, alt
            else:
                entry["fallback_tried"] = {"kind": fallback, **alt}
        faiss.write_index(index, os.path.join(out, index_file(m)))
        section[m] = {"file": index_file(m), "kind": chosen, **entry,
                      "bytes": os.path.getsize(os.path.join(out, index_file(m)))}
        log.info("ann: %s index %s, %s", m, chosen, entry)
    kinds = {section[m]["kind"] for m in embs}
    section["kind"] = kinds.pop() if len(kinds) == 1 else "mixed"
    return section


def _build_tuned(spec: str, emb: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                 cfg: AnnConfig, parts: int, rng: np.random.Generator) -> tuple[Any, dict]:
    """The ``spec`` index of ``emb``, tuned on one half of the queries, with the recall of the
    other half: the setting was chosen to pass on the tuning half, so its recall there flatters
    it."""
    t0 = time.perf_counter()
    index = _add(_train(spec, emb, rng), emb, parts)
    built = time.perf_counter() - t0
    tune_on, held = halves(len(queries))
    tuned = tune(index, queries[tune_on], truth[tune_on], cfg.target_recall, cfg.max_query_ms,
                 cfg.max_ef)
    tuned["recall_tuning"] = tuned.pop("recall")
    tuned["recall"] = round(recall_at_k(index.search(queries[held], cfg.k)[1], truth[held]), 4)
    return index, {"build_s": round(built, 2), "queries": len(queries[held]),
                   "tuning_queries": len(queries[tune_on]), **tuned}


def read_flags(mmap: bool) -> int:
    """faiss ``read_index`` flags that map the whole index file rather than copy it.

    ``IO_FLAG_MMAP`` maps only an IVF index's inverted lists: an HNSW index (what ``auto`` picks
    above ``exact_below`` without a tight budget) was read into every replica's RAM.
    ``IO_FLAG_MMAP_IFC`` (in the faiss we pin) reads codes, vectors and graph links in place
    from the mapped file, for every index kind we build, so the replicas on a node share those
    pages."""
    faiss = _faiss()
    if not mmap:
        return 0
    return getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)


def load(index_dir: str, modality: str, section: dict[str, Any], mmap: bool = True):
    """The stored index with its stored search setting (memory-mapped: :func:`read_flags`)."""
    faiss = _faiss()
    path = os.path.join(index_dir, section[modality]["file"])
    index = faiss.read_index(path, read_flags(mmap))
    set_param(index, section[modality][param_name(index)])
    return index
