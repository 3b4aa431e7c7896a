"""The ANN index ``align-ray index`` builds, at scale, in process: build time, the recall and
setting it chose, search latency and throughput against exact search at equal threads, and
memory per process with and without memory mapping.

    .venv/bin/python benchmarks/bench_ann.py --n 1000000 --dim 256 --json benchmarks/results/ann-DATE.json

Vectors are synthetic but shaped like an embedding space (clustered unit vectors; the "captions"
are their images plus noise, renormalised), because the recall of an ANN index depends on that
structure: uniform random vectors are the worst case no real model produces.  Queries are
held-out captions (never used to tune the index).  Exact search runs in the same script with the
same thread count (BLAS and faiss OpenMP both set to ``--threads``).

``--vectors DIR`` takes a real paired space instead (``image_embeddings.npy`` and
``text_embeddings.npy``, row i of each a pair, as benchmarks/real_embeddings.py writes): the last
``--queries`` captions are the held-out queries, the rest is the corpus, and ``--n``/``--dim``
are ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def corpus(n: int, dim: int, seed: int, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, n // 200), dim)).astype(np.float32)
    image = np.empty((n, dim), np.float32)
    text = np.empty((n, dim), np.float32)
    for a in range(0, n, chunk):   # in chunks: 1 M x 256 float64 temporaries would be 2 GB each
        b = min(n, a + chunk)
        # noise per coordinate scaled by 1/sqrt(dim), so its norm does not grow with the
        # dimension: an image sits at cosine ~0.7 from its cluster's centre, a caption at
        # ~0.78 from its image (a wider noise at 256 dims makes captions near-uniform, the
        # worst case for any ANN index and unlike a trained model's space)
        x = centers[rng.integers(0, len(centers), b - a)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += 1.0 * rng.standard_normal((b - a, dim)).astype(np.float32) / np.sqrt(dim)
        image[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        t = image[a:b] + 0.8 * rng.standard_normal((b - a, dim)).astype(np.float32) / np.sqrt(dim)
        text[a:b] = t / np.linalg.norm(t, axis=1, keepdims=True)
    return image, text


def latency(fn, queries: np.ndarray, concurrency: int) -> dict:
    """Per-query latency (ms) and throughput with ``concurrency`` client threads, one query each."""
    lat: list[float] = []

    def one(q):
        t0 = time.perf_counter()
        fn(q[None, :])
        lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, queries))
    wall = time.perf_counter() - t0
    lat.sort()
    return {"concurrency": concurrency, "qps": round(len(queries) / wall, 1),
            "p50_ms": round(statistics.median(lat), 3), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 3)}


def rss_child(index_path: str, mmap: bool | str, queries_path: str) -> dict:
    """RSS of a fresh process that loads the index (mmap or not, with serving's flags; or the
    faiss flag named by a string) and runs the queries."""
    flags = f"faiss.{mmap}" if isinstance(mmap, str) else f"read_flags({mmap})"
    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import numpy as np, faiss, json
from align_ray.serve.ann import read_flags
index = faiss.read_index({index_path!r}, {flags})
q = np.load({queries_path!r})
index.search(q, 10)
fields = {{}}
for line in open('/proc/self/status'):
    if line.startswith(('VmRSS', 'RssAnon', 'RssFile')):
        k, v = line.split(':'); fields[k] = int(v.split()[0]) // 1024
print(json.dumps(fields))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {k + "_mb": v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--kind", default="auto", help="AnnConfig.kind")
    p.add_argument("--memory-budget-mb", type=float, default=0.0)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2, help="BLAS and faiss OpenMP threads, both sides")
    p.add_argument("--parts", type=int, default=2, help="parallel add tasks (IVF)")
    p.add_argument("--vectors", default="", help="a folder of real paired embeddings (above)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import faiss

    from align_ray.serve import ann
    from align_ray.serve.config import AnnConfig
    from align_ray.serve.search import topk_exact

    faiss.omp_set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-ann-"))
    t0 = time.perf_counter()
    if args.vectors:
        image = np.load(Path(args.vectors, "image_embeddings.npy")).astype(np.float32)
        text = np.load(Path(args.vectors, "text_embeddings.npy")).astype(np.float32)
        args.n, args.dim = len(image) - args.queries, image.shape[1]
    else:
        image, text = corpus(args.n + args.queries, args.dim, seed=0)
    queries, text = text[args.n:].copy(), text[:args.n]
    image = image[:args.n]
    np.save(work / "image_embeddings.npy", image)
    np.save(work / "text_embeddings.npy", text)
    np.save(work / "queries.npy", queries)
    gen_s = time.perf_counter() - t0
    # both modalities, as align-ray index builds them: each index is tuned on the other's vectors
    manifest = {"count": args.n, "dim": args.dim, "modalities": ["image", "text"]}
    cfg = AnnConfig(kind=args.kind, exact_below=1, memory_budget_mb=args.memory_budget_mb)
    if args.parts > 1:
        import ray

        ray.init(num_cpus=max(args.parts, 2), include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    section = ann.build(str(work), manifest, cfg, parts=args.parts)
    build_s = time.perf_counter() - t0
    index = ann.load(str(work), "image", section)
    _, truth = topk_exact(image, queries, 10)
    _, found = index.search(queries, 10)
    held_out_recall = ann.recall_at_k(found, truth)
    result = {
        "command": " ".join(sys.argv), "n": args.n, "dim": args.dim, "threads": args.threads,
        "vectors": args.vectors or "synthetic clustered",
        "generate_s": round(gen_s, 1), "build_both_modalities_s": round(build_s, 1),
        "ann": section, "held_out_recall_at_10": round(held_out_recall, 4),
        "ann_search": [latency(lambda q: index.search(q, 10), queries, c) for c in (1, 32)],
        "exact_search": [latency(lambda q: topk_exact(image, q, 10), queries[:200], c) for c in (1, 32)],
        "memory": {"mmap": rss_child(str(work / "image.faiss"), True, str(work / "queries.npy")),
                   "in_ram": rss_child(str(work / "image.faiss"), False, str(work / "queries.npy")),
                   # what serving used before: maps only IVF lists (an HNSW index is copied)
                   "IO_FLAG_MMAP": rss_child(str(work / "image.faiss"), "IO_FLAG_MMAP",
                                             str(work / "queries.npy")),
                   "index_file_mb": round(os.path.getsize(work / "image.faiss") / 2**20, 1)},
        "load_avg": os.getloadavg(),
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
