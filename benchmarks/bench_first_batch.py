"""Time to a rank's first training batch, and to its 300th, with the window reader fused into
the decoder (Ray Data's default for two task maps of equal pool size) and kept apart (what
``ingest.RankStream`` does), alternating, in one process on a 2-CPU local Ray.

    .venv/bin/python benchmarks/bench_first_batch.py [--reps 2] [--steps 300] [--order epochs]

One rank's stream of the dev set (batch 64 of 2 workers, ``data_workers: 2``: one decode task
per rank), consumed as fast as it comes (no training beside it), in the default order
(``resampled`` auto: on for the dev set, one small read task per step) or in epochs (one
window per epoch, the order of data larger than a window).  Writes
benchmarks/results/first-batch-<order>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEV = REPO.parent / "shared/data/emoji_noto_dev.parquet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--order", choices=["auto", "epochs"], default="auto")
    args = ap.parse_args()

    import ray

    from align_ray.model import ModelConfig
    from align_ray.model.tokenizer import train_wordpiece
    from align_ray.train import ingest, preprocess, selection
    from align_ray.train.config import TrainConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    fused = [False]
    map_batches = ray.data.Dataset.map_batches

    def patched(self, fn, *a, **kw):  # drop the argument that keeps the reader apart
        if fused[0]:
            kw.pop("max_retries", None)
        return map_batches(self, fn, *a, **kw)

    ray.data.Dataset.map_batches = patched
    tok = preprocess.tokenizer_files(train_wordpiece(["a grinning face"] * 5, 200, 16))
    cfg = TrainConfig(data=[str(DEV)], image_col="image", text_col="alt_text",
                      split_col="dev_split", workers=2, batch_size=64, data_workers=2,
                      model=ModelConfig.tiny(),
                      resampled=None if args.order == "auto" else False)
    (paths, sel), _ = selection.selections(cfg)
    data = ingest.train_data(cfg, paths, sel, tokenizer=tok)
    runs: dict[str, list] = {"fused": [], "apart": []}
    for _ in range(args.reps):
        for name in ("fused", "apart"):
            fused[0] = name == "fused"
            it = ingest.RankStream(data, rank=0, world=2, batch_size=64).batches(args.steps)
            t0 = time.perf_counter()
            next(it)
            first = time.perf_counter() - t0
            for _ in range(args.steps - 1):
                next(it)
            runs[name].append({"first_s": first, "all_s": time.perf_counter() - t0})
            it.close()
            print(name, json.dumps(runs[name][-1]), flush=True)
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "cpus": os.cpu_count(), "steps": args.steps, "order": args.order, "runs": runs,
           "median": {k: {m: statistics.median(r[m] for r in v) for m in ("first_s", "all_s")}
                      for k, v in runs.items()}}
    dest = REPO / "benchmarks/results" / f"first-batch-{args.order}-{dt.datetime.now():%Y-%m-%d-%H%M}.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["median"]), "\nwrote", dest)


if __name__ == "__main__":
    main()
