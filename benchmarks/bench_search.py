#!/usr/bin/env python
"""Exact top-k search: ours (``align_ray.serve.search``, numpy matmul + argpartition in chunks)
against faiss ``IndexFlatIP``, at equal threads, for single queries and batches of queries.

For every corpus size (``--rows``) and thread count (``--threads``) both sides get the same
number of threads: ``threadpoolctl.threadpool_limits(T)`` caps every BLAS and OpenMP pool
loaded in the process (numpy's OpenBLAS, faiss's OpenBLAS and its libgomp), and
``faiss.omp_set_num_threads(T)`` sets faiss's own.  The pools actually seen are written to
the JSON (``threadpools``).  torch is not imported (our search does not use it).

Per (rows, T, batch) and round, the two sides run back to back on the same query sets, and
which goes first alternates every round, so a noisy box loads both alike.  A timed call is one
``search(queries[B, D], k)``; reported: the median ms per call over all rounds, the spread of
the per-round medians, and ours / faiss (< 1: ours is faster).  Top-k agreement with faiss is
checked on every query set.

    .venv/bin/pip install threadpoolctl            # benchmark-only
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        .venv/bin/python benchmarks/bench_search.py --json benchmarks/results/search-DATE.json

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where the machine sets them, pick an old OpenBLAS
kernel; the JSON records the kernel each pool ran, ``architecture``.)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine, write_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 100_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32],
                   help="queries per search call")
    p.add_argument("--calls", type=int, default=8,
                   help="timed calls per side, setting and round (distinct query sets)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p


def corpus(rows: int, dim: int, seed: int) -> np.ndarray:
    emb = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    from align_ray.serve.search import VectorIndex, normalize

    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_search.py", *argv]),
        "machine": machine(), "load_avg_start": os.getloadavg(),
        "env": {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        "versions": {"numpy": np.__version__, "faiss": faiss.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "threadpools": {}, "results": []}
    for rows in args.rows:
        emb = corpus(rows, args.dim, args.seed)
        ours = VectorIndex(emb)
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(emb)
        rng = np.random.default_rng(args.seed + 1)
        qsets = {b: [normalize(rng.standard_normal((b, args.dim), dtype=np.float32))
                     for _ in range(args.calls)] for b in args.batches}
        # bound methods, not lambdas over the loop's names (which the del below unbinds)
        sides = {"ours": functools.partial(ours.search, k=args.k),
                 "faiss": functools.partial(flat.search, k=args.k)}
        for threads in args.threads:
            with threadpool_limits(limits=threads):
                faiss.omp_set_num_threads(threads)
                report["threadpools"][str(threads)] = [
                    {k: p.get(k) for k in ("internal_api", "prefix", "num_threads", "version",
                                           "architecture")} for p in threadpool_info()]
                for b in args.batches:
                    agree = []
                    for q in qsets[b]:  # also the warm-up of both sides
                        _, oi = sides["ours"](q)
                        _, fi = sides["faiss"](q)
                        agree += [len(set(x) & set(y)) / args.k for x, y in zip(oi, fi)]
                    per_round: dict[str, list[float]] = {"ours": [], "faiss": []}
                    calls: dict[str, list[float]] = {"ours": [], "faiss": []}
                    for rnd in range(args.rounds):
                        order = ["ours", "faiss"] if rnd % 2 == 0 else ["faiss", "ours"]
                        for side in order:
                            times = []
                            for q in qsets[b]:
                                t0 = time.perf_counter()
                                sides[side](q)
                                times.append((time.perf_counter() - t0) * 1000)
                            calls[side] += times
                            per_round[side].append(statistics.median(times))
                    res = {"rows": rows, "dim": args.dim, "k": args.k, "threads": threads,
                           "batch": b, "top_k_agreement": round(float(np.mean(agree)), 4),
                           "load_avg_1m_after": round(os.getloadavg()[0], 2)}
                    for side in ("ours", "faiss"):
                        med = statistics.median(calls[side])
                        res[f"{side}_ms"] = round(med, 2)
                        res[f"{side}_ms_per_query"] = round(med / b, 3)
                        res[f"{side}_round_medians_ms"] = [round(x, 2) for x in per_round[side]]
                    res["ours_vs_faiss"] = round(res["ours_ms"] / res["faiss_ms"], 2)
                    report["results"].append(res)
                    print(f"rows {rows:>8}  T={threads}  batch {b:>3}:  ours {res['ours_ms']:8.2f} ms  "
                          f"faiss {res['faiss_ms']:8.2f} ms  ours/faiss {res['ours_vs_faiss']:.2f}  "
                          f"(round medians ours {res['ours_round_medians_ms']}, faiss "
                          f"{res['faiss_round_medians_ms']}; agreement {res['top_k_agreement']}; "
                          f"load {res['load_avg_1m_after']})",
                          flush=True)
        del ours, flat, emb
    report["load_avg_end"] = os.getloadavg()
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
