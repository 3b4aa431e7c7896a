#!/usr/bin/env python
"""Retrieval over HTTP at 1 M x 256 (issue 16 part 4): ``/v1/search`` and clip-retrieval's
``/knn-service`` through Serve's proxy and the Router, with the tuned ANN index that
``align-ray index`` builds, against exact search in the same script.

    .venv/bin/python benchmarks/bench_retrieval_http.py --json benchmarks/results/retrieval-http-DATE.json

``--shards N`` serves the index over N ``IndexShard`` deployments (``index_shards: N``) and
builds it as ``align-ray index`` with ``ann.shards: N`` does (one tuned index per shard,
align_ray/serve/ann_shards.py): ``auto`` is then those per-shard indexes, ``exact`` each
shard's matrix product over its rows (what sharded serving did before they existed).

``--ingress proxy haproxy`` compares Serve's two HTTP ingresses (align_ray/serve/ingress.py):
the Python proxy (Ray's default) and HAProxy.  Ray reads that choice when its processes start,
so each (round, ingress) runs in a child process of this script with a Ray of its own, the
ingresses alternating within a round; the index is built once and shared (``--work``).

What runs, per round (``--rounds``, the backends alternating so a noisy box loads both alike):

1. Serve the index with ``backend: auto`` (the stored IVF index, memory-mapped, at its tuned
   nprobe) or ``backend: exact`` (the Router's matrix product over the 1 GB of vectors).
2. Closed-loop aiohttp clients at each ``--concurrency`` for ``--seconds``, one endpoint at a
   time: ``/v1/search`` with an embedding (the index alone), with a text (TextEncoder + index),
   ``/knn-service`` with ``embedding_input`` and with ``text``, and ``GET /indices-list`` (proxy
   + Router, no work: the floor of the per-request cost; ``/healthz`` pings both encoders).
3. Every ``/v1/search`` and ``/knn-service`` embedding answer is scored against exact top-10
   of the same held-out caption vector (recall@10 measured on what the clients received).
4. CPU per request: the machine's busy core-seconds during the load (``/proc/stat``) minus
   the client process's own CPU time, over the requests answered: proxy, Router, encoder and
   search together (and whatever else ran on the box: keep it quiet).

The vectors are bench_ann.py's synthetic, clustered space (images around N/200 centres, captions
near their image); queries are held-out captions.  The index is built once, as ``align-ray
index`` builds it (``ann.build``: k-means on a sample, 2 parallel add tasks, nprobe tuned for
recall@10 >= 0.95 on captions it never serves here).  The text tower is bench_serve.py's
MiniLM-sized random init: its forward is what a text query costs, its answers are not compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ENDPOINTS = ("search_embedding", "search_text", "knn_embedding", "knn_text", "indices_list")


def write_index(work: Path, image: np.ndarray, text: np.ndarray) -> dict:
    """An index dir as ``align-ray index`` writes it: both modalities' vectors, metadata,
    index.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = image.shape
    np.save(work / "image_embeddings.npy", image)
    np.save(work / "text_embeddings.npy", text)
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"id": np.arange(n), "text": [f"item {i}" for i in range(n)],
                             "url": [None] * n,
                             "phash": rng.integers(0, 2**63, n, dtype=np.uint64),
                             "text_hash": rng.integers(0, 2**63, n, dtype=np.uint64)}),
                   work / "metadata.parquet")
    manifest = {"format": 1, "count": n, "dim": dim, "modalities": ["image", "text"],
                "dropped": 0}
    (work / "index.json").write_text(json.dumps(manifest))
    return manifest


async def load(url: str, bodies: list, seconds: float, concurrency: int,
               check=None) -> dict:
    """Closed-loop clients; ``bodies`` None = GET.  ``check(i, json)`` -> recall of answer i."""
    import aiohttp

    from _bench_common import machine_busy_seconds

    lat, recalls, errors = [], [], 0
    busy0, client0 = machine_busy_seconds(), time.process_time()
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def client():
            nonlocal errors
            while time.perf_counter() < stop:
                i = next(counter)
                t = time.perf_counter()
                if bodies is None:
                    r = await s.get(url)
                else:
                    r = await s.post(url, json=bodies[i % len(bodies)])
                async with r:
                    payload = await r.read()
                lat.append(time.perf_counter() - t)
                if r.status != 200:
                    errors += 1
                elif check is not None:
                    recalls.append(check(i % len(bodies), json.loads(payload)))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    # CPU per request on the server side: the whole machine's busy core-seconds minus this
    # client process's own (aiohttp, JSON), over the requests answered
    busy, client = machine_busy_seconds() - busy0, time.process_time() - client0
    ms = np.asarray(lat) * 1000
    out = {"requests": len(lat), "qps": round(len(lat) / wall, 1), "errors": errors,
           "server_cpu_ms_per_request": round((busy - client) * 1000 / max(len(lat), 1), 2),
           "client_cpu_ms_per_request": round(client * 1000 / max(len(lat), 1), 2),
           "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
           "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}
    if recalls:
        out["recall_at_10"] = round(float(np.mean(recalls)), 4)
    return out


def run_backend(backend: str, model: str, index: Path, queries: np.ndarray, truth: np.ndarray,
                args) -> dict:
    import requests
    from ray import serve

    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig
    from bench_serve import texts

    # one replica a shard, a quarter CPU each; the target sets the Router's batches in flight
    # per index (ShardConfig.batches_in_flight: ceil(1 x target) here, no replica is added)
    shards = dict(index_shards=args.shards,
                  index_shard=dict(min_replicas=1, max_replicas=1, num_cpus=0.25,
                                   target_ongoing_requests=args.shard_target)) \
        if args.shards > 1 else {}
    cfg = ServeConfig.from_dict(dict(model=model, index=str(index), port=args.port,
                                     backend=backend, app_name="bench-http", index_name="bench",
                                     ingress=args.ingress[0], **shards))
    t0 = time.perf_counter()
    base = app.start(cfg)
    deadline = time.monotonic() + 300
    while True:   # the proxy may come up after the deployments
        try:
            if requests.get(f"{base}/healthz", timeout=30).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the app did not become healthy"
        time.sleep(1)
    out: dict = {"backend": backend, "ingress": cfg.ingress,
                 "deploy_s": round(time.perf_counter() - t0, 1)}
    qs = [q.tolist() for q in queries]
    words = texts(np.random.default_rng(3), 512)

    def ids_recall(ids: list[int], i: int) -> float:
        return len(set(ids) & set(truth[i].tolist())) / truth.shape[1]

    cases = {
        "search_embedding": (f"{base}/v1/search", [{"embedding": q, "k": 10} for q in qs],
                             lambda i, js: ids_recall([h["id"] for h in js["results"]], i)),
        "search_text": (f"{base}/v1/search", [{"text": t, "k": 10} for t in words], None),
        "knn_embedding": (f"{base}/knn-service",
                          [{"embedding_input": q, "modality": "image", "num_images": 10,
                            "indice_name": "bench"} for q in qs],
                          lambda i, js: ids_recall([h["id"] for h in js], i)),
        "knn_text": (f"{base}/knn-service", [{"text": t, "modality": "image", "num_images": 10,
                                              "indice_name": "bench"} for t in words], None),
        "indices_list": (f"{base}/indices-list", None, None),
    }
    try:
        for name in ENDPOINTS:
            url, bodies, check = cases[name]
            asyncio.run(load(url, bodies, 2.0, max(args.concurrency)))          # warm-up
            for c in args.concurrency:
                out[f"{name}_c{c}"] = asyncio.run(load(url, bodies, args.seconds, c, check))
                print(backend, name, c, out[f"{name}_c{c}"], flush=True)
    finally:
        serve.delete("bench-http")
    return out


def medians(runs: list[dict]) -> dict:
    """Per (ingress, backend, endpoint cell): the median of each figure over the rounds."""
    summary: dict = {}
    for group in sorted({(x["ingress"], x["backend"]) for x in runs}):
        mine = [x for x in runs if (x["ingress"], x["backend"]) == group]
        for key in mine[0]:
            if not isinstance(mine[0][key], dict):
                continue
            name = "/".join(group) + "/" + key
            summary[name] = {
                m: round(statistics.median(x[key][m] for x in mine), 4 if "recall" in m else 1)
                for m in ("qps", "p50_ms", "p99_ms", "recall_at_10", "server_cpu_ms_per_request",
                          "client_cpu_ms_per_request") if m in mine[0][key]}
            summary[name]["errors"] = sum(x[key]["errors"] for x in mine)
    return summary


def compare_ingresses(args) -> int:
    """One child run of this script per (round, ingress), the ingresses alternating; the first
    child builds the index into ``--work``, the others reuse it."""
    import subprocess

    from _bench_common import machine

    t_all = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-http-", dir="/tmp"))
    result: dict = {"command": " ".join(sys.argv), "machine": machine(), "n": args.n,
                    "dim": args.dim, "load_avg_start": os.getloadavg()}
    runs: list[dict] = []
    for r in range(args.rounds):
        for ing in args.ingress if r % 2 == 0 else list(reversed(args.ingress)):
            out = work.parent / f"{work.name}-{r}-{ing}.json"
            cmd = [sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim),
                   "--queries", str(args.queries), "--kind", args.kind, "--seconds",
                   str(args.seconds), "--concurrency", *map(str, args.concurrency), "--rounds", "1",
                   "--backends", *args.backends, "--ingress", ing, "--work", str(work),
                   "--shards", str(args.shards), "--shard-target", str(args.shard_target),
                   "--json", str(out)]
            subprocess.run(cmd, check=True)
            child = json.loads(out.read_text())
            result.setdefault("ann", child["ann"])
            if "build_both_modalities_s" in child:
                result["build_both_modalities_s"] = child["build_both_modalities_s"]
            runs += [{**x, "round": r} for x in child["runs"]]
    result["runs"] = runs
    result["median_over_rounds"] = summary = medians(runs)
    result["load_avg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    result["work"] = str(work)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=500, help="held-out caption vectors")
    p.add_argument("--kind", default="ivf", help="AnnConfig.kind (auto picks HNSW32 at 1 M)")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["auto", "exact"])
    p.add_argument("--ingress", nargs="+", default=["proxy"], choices=["proxy", "haproxy"],
                   help="Serve's HTTP ingress(es); several: one child process per round and ingress")
    p.add_argument("--shards", type=int, default=1,
                   help="> 1: per-shard ANN indexes, served over that many IndexShard deployments")
    p.add_argument("--shard-target", type=float, default=1.0,
                   help="the shards' target_ongoing_requests (max_replicas 1): the Router keeps "
                        "ceil(target) batches in flight per index")
    p.add_argument("--work", help="reuse an index dir built by an earlier run")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if len(args.ingress) > 1:
        return compare_ingresses(args)

    from align_ray.serve import ingress

    ingress.prepare(args.ingress[0], "local")    # before ray.serve is imported
    import ray

    from _bench_common import machine
    from align_ray.serve import ann
    from align_ray.serve.config import AnnConfig
    from align_ray.serve.search import topk_exact
    from bench_ann import corpus
    from bench_serve import build_model

    from bench_serve import free_port

    args.port = free_port()      # one proxy for the whole run (serve.start keeps its first port)
    t_all = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result: dict = {"command": " ".join(sys.argv), "machine": machine(), "n": args.n,
                    "dim": args.dim, "load_avg_start": os.getloadavg()}
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-http-", dir="/tmp"))
    section = "ann_shards" if args.shards > 1 else "ann"
    if not (work / "index.json").exists() or section not in json.loads((work / "index.json").read_text()):
        work.mkdir(parents=True, exist_ok=True)
        image, text = corpus(args.n + args.queries, args.dim, seed=0)
        np.save(work / "queries.npy", text[args.n:])
        manifest = write_index(work, image[:args.n], text[:args.n])
        del image, text
        t0 = time.perf_counter()
        if args.shards > 1:
            from align_ray.serve import ann_shards

            manifest["ann"] = {"kind": "flat", "recall_at_k": 1.0}
            manifest[section] = ann_shards.build(
                str(work), manifest, AnnConfig(kind=args.kind, exact_below=1, shards=args.shards),
                parts=2)
        else:
            manifest["ann"] = ann.build(str(work), manifest,
                                        AnnConfig(kind=args.kind, exact_below=1), parts=2)
        result["build_both_modalities_s"] = round(time.perf_counter() - t0, 1)
        (work / "index.json").write_text(json.dumps(manifest))
        build_model(str(work / "model"), args.dim, 384, 6)
    manifest = json.loads((work / "index.json").read_text())
    result["ann"] = manifest[section]
    result["shards"], result["shard_target"] = args.shards, args.shard_target
    queries = np.load(work / "queries.npy")[:args.queries]
    _, truth = topk_exact(np.load(work / "image_embeddings.npy", mmap_mode="r"), queries, 10)

    runs: list[dict] = []
    for r in range(args.rounds):
        order = args.backends if r % 2 == 0 else list(reversed(args.backends))
        for backend in order:
            runs.append({"round": r, **run_backend(backend, str(work / "model"), work,
                                                   queries, truth, args)})
    result["runs"] = runs
    result["median_over_rounds"] = medians(runs)
    result["load_avg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    result["work"] = str(work)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median_over_rounds"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
