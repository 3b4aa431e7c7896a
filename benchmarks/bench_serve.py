"""Serving benchmark (one run, one JSON result):

1. Text-embedding throughput and p50/p99 latency at concurrency 32, TextEncoder with dynamic
   batching (``max_batch_size`` 32) vs batch size 1; both through the DeploymentHandle (the
   encoder alone) and over HTTP (``POST /v1/embed/text`` through proxy + Router).
2. Exact top-10 over N x 256 float32 (default 1M) -- ours (numpy matmul + argpartition in
   chunks; also a torch.mm + topk variant) vs faiss ``IndexFlatIP``, same run, same queries.
3. End-to-end ``POST /v1/search`` QPS (text query -> TextEncoder -> exact search in the Router)
   over the same 1M index, and over a 10k one (serving overhead without the scan).

    .venv/bin/python benchmarks/bench_serve.py [--rows 1000000] [--seconds 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._bench_common import machine, prepare_env  # noqa: E402

WORDS = ("red blue green small large happy dog cat tree house car face smiling heart star "
         "moon sun river city night beach flower bird old new").split()


def texts(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(lat: list[float], seconds: float) -> dict:
    a = np.asarray(lat) * 1000
    return {"requests": len(a), "rps": round(len(a) / seconds, 1),
            "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def build_model(out: str, dim: int, hidden: int, layers: int) -> str:
    """Random init; the text tower is MiniLM-sized by default (6 x 384): with the 2 x 128 test
    tower a forward costs less than a Serve call, and there would be nothing to batch."""
    import torch

    from align_ray.model import DualEncoder, ModelConfig, save_pretrained, train_wordpiece

    torch.manual_seed(0)
    text_config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       intermediate_size=4 * hidden, max_position_embeddings=128)
    cfg = ModelConfig.tiny(embed_dim=dim, text_config=text_config)
    tok = train_wordpiece(texts(np.random.default_rng(0), 2000), vocab_size=cfg.vocab_size)
    save_pretrained(DualEncoder(cfg, len(tok)), tok, cfg, out)
    return out


def write_index(out: str, emb: np.ndarray) -> str:
    """A synthetic image-only index dir (random unit vectors + metadata), same layout as
    ``align-ray index`` writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out, exist_ok=True)
    n, dim = emb.shape
    np.save(os.path.join(out, "image_embeddings.npy"), emb)
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"id": np.arange(n), "text": [f"item {i}" for i in range(n)],
                             "url": [None] * n,
                             "phash": rng.integers(0, 2**63, n, dtype=np.uint64),
                             "text_hash": rng.integers(0, 2**63, n, dtype=np.uint64)}),
                   os.path.join(out, "metadata.parquet"))
    json.dump({"format": 1, "count": n, "dim": dim, "modalities": ["image"], "dropped": 0},
              open(os.path.join(out, "index.json"), "w"))
    return out


# ------------------------------------------------------------------------------ 2. search
def bench_search(emb: np.ndarray, n_queries: int = 30, k: int = 10) -> dict:
    import faiss
    import torch

    from align_ray.serve.search import VectorIndex, normalize

    q = normalize(np.random.default_rng(7).standard_normal((n_queries, emb.shape[1])))
    ours = VectorIndex(emb)
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    build_s = time.perf_counter() - t
    temb = torch.from_numpy(emb)

    def torch_topk(v):
        s = torch.mv(temb, torch.from_numpy(v))
        return torch.topk(s, k)

    fns = {"ours_exact_ms": lambda v: ours.search(v, k),
           "faiss_flatip_ms": lambda v: flat.search(v[None], k),
           "torch_mv_topk_ms": torch_topk}
    lat: dict[str, list[float]] = {name: [] for name in fns}
    for i, v in enumerate(q):        # interleaved, rotating order: same load for every method
        names = list(fns)[i % 3:] + list(fns)[:i % 3]
        for name in names:
            t0 = time.perf_counter()
            fns[name](v)
            lat[name].append(time.perf_counter() - t0)
    res = {"rows": emb.shape[0], "dim": emb.shape[1], "k": k, "queries": n_queries,
           "threads": {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()},
           "faiss_add_s": round(build_s, 2)}
    for name, values in lat.items():   # first round is warm-up
        res[name] = round(float(np.median(values[1:])) * 1000, 2)
    res["ours_vs_faiss"] = round(res["ours_exact_ms"] / res["faiss_flatip_ms"], 2)
    # batched queries (32 at once): BLAS-3 for both
    t0 = time.perf_counter(); ours.search(q[:32] if len(q) >= 32 else q, k); t1 = time.perf_counter()
    flat.search(q[:32] if len(q) >= 32 else q, k); t2 = time.perf_counter()
    res["batch_queries"] = min(32, len(q))
    res["ours_batch_ms"], res["faiss_batch_ms"] = round((t1 - t0) * 1000, 1), round((t2 - t1) * 1000, 1)
    # agreement
    _, oi = ours.search(q, k)
    _, fi = flat.search(q, k)
    res["top10_agreement"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(oi, fi)]))
    return res


# ------------------------------------------------------------------------------ 1./3. load
async def handle_load(handle, payloads: list, seconds: float, concurrency: int) -> dict:
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    it = iter(range(10**9))

    async def worker():
        while time.perf_counter() < stop:
            p = payloads[next(it) % len(payloads)]
            t = time.perf_counter()
            await handle.embed.remote(p)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stats(lat, time.perf_counter() - t0)


async def http_load(url: str, bodies: list[dict], seconds: float, concurrency: int) -> dict:
    import aiohttp

    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    it = iter(range(10**9))
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker():
            nonlocal errors
            while time.perf_counter() < stop:
                body = bodies[next(it) % len(bodies)]
                t = time.perf_counter()
                async with s.post(url, json=body) as r:
                    await r.read()
                    errors += r.status != 200
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    out = stats(lat, time.perf_counter() - t0)
    out["errors"] = errors
    return out


GIL_SWITCH_S = 0.0005


def serve_round(model: str, index: str | None, max_batch: int, port: int, seconds: float,
                conc: int, search_index: bool, encoder_cpus: float = 0.5,
                batch_wait: float = 0.005) -> dict:
    from ray import serve

    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    enc = dict(min_replicas=1, max_replicas=1, num_cpus=encoder_cpus, max_batch_size=max_batch,
               max_ongoing_requests=64, target_ongoing_requests=16, batch_wait_timeout_s=batch_wait,
               gil_switch_interval_s=GIL_SWITCH_S)
    cfg = ServeConfig.from_dict(dict(model=model, index=index, port=port, text_encoder=enc,
                                     image_encoder=dict(enc, max_batch_size=8, num_cpus=0.5),
                                     app_name="bench",
                                     router=dict(max_ongoing_requests=256)))
    base = app.start(cfg)
    rng = np.random.default_rng(3)
    out: dict = {"max_batch_size": max_batch, "batch_wait_timeout_s": batch_wait}
    try:
        handle = serve.get_deployment_handle("TextEncoder", "bench")
        one = [[t] for t in texts(rng, 512)]
        asyncio.run(handle_load(handle, one, 2, conc))                       # warm-up
        out["handle_c32"] = asyncio.run(handle_load(handle, one, seconds, conc))
        info = handle.info.remote().result()
        out["mean_batch"] = round(info["items"] / max(info["batches"], 1), 1)
        # a lone client: what the batch wait costs when no batch can form
        out["handle_c1"] = asyncio.run(handle_load(handle, one, min(seconds, 3.0), 1))
        bodies = [{"texts": t} for t in one]
        out["http_embed_c32"] = asyncio.run(http_load(f"{base}/v1/embed/text", bodies, seconds, conc))
        if search_index:
            q = [{"text": t[0], "k": 10} for t in one]
            for c in (8, 32):
                out[f"http_search_c{c}"] = asyncio.run(http_load(f"{base}/v1/search", q, seconds, c))
    finally:
        serve.delete("bench")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--model", help="a save_pretrained dir (default: random init, see below)")
    ap.add_argument("--text-hidden", type=int, default=384)
    ap.add_argument("--text-layers", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=2,
                    help="embedding rounds per setting, alternating batch-1 / dynamic (median)")
    ap.add_argument("--batch-waits", default="0.005",
                    help="comma list of batch_wait_timeout_s for the dynamic rounds (the first is "
                         "'embed_dynamic'; others add 'embed_dynamic_wait<ms>ms')")
    ap.add_argument("--skip", default="", help="comma list of: embed,search,e2e")
    ap.add_argument("--throughput-optimized", action="store_true",
                    help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for every process (Serve's own mode: user "
                         "code and router on the replica's main loop, gRPC between processes)")
    ap.add_argument("--encoder-cpus", type=float, default=float(os.cpu_count() or 1),
                    help="num_cpus of the TextEncoder replica, the same in every round (Ray sets "
                         "its torch/OMP threads to floor(num_cpus)); default: this machine's cores")
    ap.add_argument("--gil-switch-interval", type=float, default=GIL_SWITCH_S,
                    help="encoders' gil_switch_interval_s (EncoderConfig default 0.0005; CPython's 0.005)")
    args = ap.parse_args()
    globals()["GIL_SWITCH_S"] = args.gil_switch_interval
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    prepare_env(work)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"machine": machine(), "throughput_optimized": args.throughput_optimized,
                    "gil_switch_interval_s": args.gil_switch_interval, "argv": sys.argv[1:],
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "load_avg_start": os.getloadavg()}
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    if "search" not in skip:
        result["search"] = bench_search(emb)
        print(json.dumps(result["search"]), flush=True)
    model = args.model or build_model(str(work / "model"), args.dim, args.text_hidden, args.text_layers)
    result["model"] = args.model or {"text_hidden": args.text_hidden, "text_layers": args.text_layers,
                                     "embed_dim": args.dim, "init": "random"}
    big = write_index(str(work / "index-1m"), emb)
    small = write_index(str(work / "index-10k"), emb[:10_000].copy())
    del emb
    import ray
    from ray import serve

    from align_ray import ray_env
    if args.throughput_optimized:
        # for the cluster's processes only (they inherit it from ray.init's local start); this
        # driver imported Serve above, so its handles keep their own router loop, which the
        # benchmark's repeated asyncio.run() calls need
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    ray_env.init("local", num_cpus=max(4, math.ceil(args.encoder_cpus) + 2), include_dashboard=False,
                 log_to_driver=False)
    port = free_port()
    try:
        if "embed" not in skip:
            # rounds alternate batch-1 / dynamic so slow drift on the box hits both alike;
            # each figure is the median over its rounds
            result["encoder_cpus"] = args.encoder_cpus
            waits = [float(w) for w in args.batch_waits.split(",")]
            settings = [("embed_batch1", 1, waits[0])] + [
                ("embed_dynamic" if i == 0 else f"embed_dynamic_wait{round(w * 1000):g}ms", 32, w)
                for i, w in enumerate(waits)]
            runs: dict[str, list] = {name: [] for name, _, _ in settings}
            for _ in range(args.rounds):
                for name, mb, wait in settings:
                    r = serve_round(model, None, mb, port, args.seconds, args.concurrency, False,
                                    args.encoder_cpus, wait)
                    runs[name].append(r)
                    print(name, json.dumps(r), flush=True)
            for name, rs in runs.items():
                result[name] = rs[0] if len(rs) == 1 else {"rounds": rs}
                for via in ("handle_c32", "http_embed_c32"):
                    result[name].setdefault("median_rps", {})[via] = float(
                        np.median([r[via]["rps"] for r in rs]))
                result[name]["median_mean_batch"] = float(np.median([r["mean_batch"] for r in rs]))
                result[name]["median_c1_p50_ms"] = float(np.median([r["handle_c1"]["p50_ms"] for r in rs]))
            for name in runs:
                if name == "embed_batch1":
                    continue
                suffix = name[len("embed_dynamic"):]
                for via in ("handle_c32", "http_embed_c32"):
                    result[f"speedup_{via}{suffix}"] = round(result[name]["median_rps"][via]
                                                             / result["embed_batch1"]["median_rps"][via], 2)
        if "e2e" not in skip:
            result["e2e_1m"] = serve_round(model, big, 32, port, args.seconds, args.concurrency, True,
                                           args.encoder_cpus)
            print(json.dumps(result["e2e_1m"]), flush=True)
            result["e2e_10k"] = serve_round(model, small, 32, port, args.seconds, args.concurrency,
                                            True, args.encoder_cpus)
            print(json.dumps(result["e2e_10k"]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    result["load_avg_end"] = os.getloadavg()
    out = args.out or str(Path(__file__).parent / "results" /
                          f"serve-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json")
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("speedup") or k == "search"}, indent=1))
    print("written", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
