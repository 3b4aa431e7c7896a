"""The near-duplicate rule's cost (align_ray/filter/neardup.py): the bucket kernel's pair
comparisons per second on one core, the bucket sizes random pHashes give, and the whole band
search (aggregate, band keys, buckets, per-image merge) on a local Ray at N images, next to the
brute-force count of the same matches.

    .venv/bin/python benchmarks/bench_neardup.py --images 200000 --distance 4 \
        --json benchmarks/results/neardup-DATE.json

Hashes are uniform random 64-bit values plus planted copies (1 % of the images, 1..d bits
flipped), so the buckets are as small as pHashes ever get; real corpora are skewed and the
stage's ``stats.json`` reports their candidate counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pyarrow as pa


def kernel_rate(n: int, d: int, repeats: int = 3) -> float:
    """Pair comparisons per second of ``_bucket`` on one bucket of ``n`` images."""
    from align_ray.filter.neardup import _bucket

    rng = np.random.default_rng(0)
    t = pa.table({"img_id": pa.array(np.arange(n, dtype=np.uint64)),
                  "phash": pa.array(rng.integers(0, 2**64, n, dtype=np.uint64)),
                  "first_key": pa.array(rng.permutation(n).astype(np.int64))})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _bucket(t, d)
        times.append(time.perf_counter() - t0)
    return n * n / float(np.median(times))


def whole_rule(n: int, d: int, partitions: int) -> dict:
    import ray
    import ray.data

    from align_ray.filter.neardup import matches, summary

    rng = np.random.default_rng(1)
    ph = rng.integers(0, 2**64, n, dtype=np.uint64)
    planted = rng.choice(n, n // 100, replace=False)
    for j, i in enumerate(planted):
        bits = rng.choice(64, 1 + j % d, replace=False)
        ph[(i + 1) % n] = ph[i] ^ np.uint64(sum(1 << int(b) for b in bits))
    rows = ray.data.from_arrow(pa.table({"img_id": pa.array(np.arange(n, dtype=np.uint64)),
                                         "phash": pa.array(ph),
                                         "key_id": pa.array(np.arange(n, dtype=np.int64))}))
    rows = rows.repartition(max(2, n // 50_000)).materialize()
    t0 = time.perf_counter()
    found = matches(rows, d, partitions).materialize()
    s = summary(found, d)
    s["seconds"] = round(time.perf_counter() - t0, 2)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--distance", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import ray

    out = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "distance": args.distance,
           "kernel_pairs_per_s": {str(n): round(kernel_rate(n, args.distance))
                                  for n in (512, 4096, 16384)}}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out["whole_rule"] = {"images": args.images, **whole_rule(args.images, args.distance,
                                                            args.partitions)}
    ray.shutdown()
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
