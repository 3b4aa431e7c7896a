"""The training time of a PQ index with and without faiss's polysemous training (on by default
in ``index_factory``; ``align_ray.serve.ann._empty`` turns it off because we never run
polysemous search).  Both variants in one process, alternating, on the same vectors and threads.

    .venv/bin/python benchmarks/bench_pq_train.py --json benchmarks/results/pq-train-DATE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--spec", default="IVF256,PQ8x8")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    import faiss

    from _bench_common import machine
    from align_ray.serve import ann

    faiss.omp_set_num_threads(args.threads)
    x = np.random.default_rng(0).random((args.n, args.dim), dtype=np.float32)
    times: dict[str, list[float]] = {"factory_default": [], "ours": []}
    for _ in range(args.runs):
        for name in times:
            index = (faiss.index_factory(args.dim, args.spec, faiss.METRIC_INNER_PRODUCT)
                     if name == "factory_default" else ann._empty(args.spec, args.dim))
            t0 = time.perf_counter()
            index.train(x)
            times[name].append(round(time.perf_counter() - t0, 3))
    result = {"command": " ".join(sys.argv), "machine": machine(), "faiss": faiss.__version__,
              **vars(args), "train_s": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()}}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
