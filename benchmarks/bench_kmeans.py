"""SemDeDup's k-means: the sample's start alone against the start plus passes over every row.

SemDeDup compares only rows that k-means puts in one cluster, so what a clustering costs it is
the near-duplicate pairs it splits. At the auto k (one cluster per ~10 k rows) and the default
200 k-row sample, a 2 B-row corpus has about one sampled row per centroid. This script
reproduces those ratios on real data small enough for this box: the shared dev set's 1,540
images as vectors (16 x 16 RGB on white, mean-centred, unit length: real pictures, no model in
between), k = n / 10, and a sample of k rows (the 2 B case), 4 k, or all n.

For each (sample, passes) it runs ``align_ray.filter.kmeans.fit`` on a local Ray with the
machine's CPUs, then reports the mean cosine of the rows to their centroid, the share of
near-duplicate pairs (cosine > 0.95 and > 0.90) whose two rows share a cluster (what SemDeDup
can still find), the largest cluster, and the fit's seconds (median of ``--runs``, warm Ray).

    .venv/bin/python benchmarks/bench_kmeans.py --out benchmarks/results/kmeans-dev.json

``--synthetic N D K`` times the fit instead, on N random rows of dimension D around K centres
in 16 blocks (what a pass costs; the data says nothing about quality):

    .venv/bin/python benchmarks/bench_kmeans.py --synthetic 500000 256 50 --out ...
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from _bench_common import DEV_SET, machine, write_json


def dev_vectors(side: int = 16) -> np.ndarray:
    images = pq.read_table(DEV_SET, columns=["image"]).column("image").to_pylist()
    rows = []
    for b in images:
        im = Image.open(io.BytesIO(b)).convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(bg, im).convert("RGB").resize((side, side), Image.BOX)
        rows.append(np.asarray(rgb, np.float32).ravel() / 255)
    x = np.stack(rows)
    x -= x.mean(0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pair_recall(x: np.ndarray, labels: np.ndarray, cos: float) -> tuple[int, float]:
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims > cos, 1))
    return len(i), float(np.mean(labels[i] == labels[j])) if len(i) else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--passes", type=int, nargs="+", default=[0, 5, 50])
    ap.add_argument("--synthetic", type=int, nargs=3, metavar=("N", "D", "K"))
    args = ap.parse_args()

    import ray
    import ray.data

    from align_ray.filter import kmeans, semdedup

    ray.init(log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if args.synthetic:
        return timing(args, *args.synthetic)
    x = dev_vectors()
    d = x.shape[1]
    table = pa.table({"key_id": pa.array(np.arange(len(x)) * 2654435761 % (1 << 40), pa.int64()),
                      semdedup.EMB_COL: semdedup.packed(pa.FixedSizeListArray.from_arrays(
                          pa.array(x.ravel(), pa.float32()), d))})
    xs = semdedup.emb_rows(table)   # what k-means sees (float16, unit again)
    cuts = np.linspace(0, len(x), 9).astype(int)   # 8 blocks
    ds = ray.data.from_arrow([table.slice(a, b - a) for a, b in zip(cuts, cuts[1:])])
    k = len(x) // 10
    rows = []
    for sample in (k, 4 * k, len(x)):
        for passes in args.passes:
            secs = []
            for _ in range(args.runs):
                t = time.perf_counter()
                c, fit = kmeans.fit(ds, k, semdedup.emb_rows, sample, passes, 2)
                secs.append(time.perf_counter() - t)
            labels, sims = kmeans.nearest(xs, c)
            row = {"sample_rows": fit["train_rows"], "passes_asked": passes,
                   "passes_run": fit["passes"], "clusters": fit["clusters"],
                   "mean_cosine": round(float(sims.mean()), 4),
                   "largest_cluster": int(np.bincount(labels).max()),
                   "fit_seconds_median": round(statistics.median(secs), 2)}
            for cos in (0.95, 0.90):
                n, rec = pair_recall(xs, labels, cos)
                row[f"pairs_cos_gt_{cos}"], row[f"same_cluster_{cos}"] = n, round(rec, 4)
            print(row, flush=True)
            rows.append(row)
    write_json(args.out, {"rows": len(x), "dim": d, "k": k, "runs": args.runs,
                          "machine": machine(), "results": rows})


def timing(args, n: int, d: int, k: int) -> None:
    import ray.data

    from align_ray.filter import kmeans, semdedup

    rng = np.random.default_rng(0)
    centres = kmeans.unit(rng.normal(size=(k, d)))
    x = kmeans.unit(centres[rng.integers(0, k, n)] + 2.4 * rng.normal(size=(n, d)) / np.sqrt(d))
    cuts = np.linspace(0, n, 17).astype(int)
    ds = ray.data.from_arrow([pa.table({
        "key_id": pa.array(np.arange(a, b) * 2654435761 % (1 << 40), pa.int64()),
        semdedup.EMB_COL: semdedup.packed(pa.FixedSizeListArray.from_arrays(
            pa.array(x[a:b].ravel(), pa.float32()), d))}) for a, b in zip(cuts, cuts[1:])])
    ds = ds.materialize()
    rows = []
    for passes in args.passes:
        secs = []
        for _ in range(args.runs):
            t = time.perf_counter()
            _, fit = kmeans.fit(ds, k, semdedup.emb_rows, 200_000, passes, 4)
            secs.append(time.perf_counter() - t)
        rows.append({"passes_asked": passes, "passes_run": fit["passes"],
                     "sample_rows": fit["train_rows"], "mean_cosine": fit["mean_cosine"],
                     "fit_seconds_median": round(statistics.median(secs), 2)})
        print(rows[-1], flush=True)
    write_json(args.out, {"synthetic": {"rows": n, "dim": d, "k": k}, "runs": args.runs,
                          "machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
