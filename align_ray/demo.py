"""``align-ray demo``: the data stage end to end on the built-in noisy web, on one machine.

Starts the noisy web on 127.0.0.1, writes its URL list (ALIGN-style noise plus a few of every
transport/decoding fault), runs the download stage on it with Ray, and prints where everything
went.  The whole chain, data to serve, is ``python workflows/end_to_end.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from align_ray import ray_env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="align-ray demo", description=__doc__)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--output", default="demo-output")
    p.add_argument("--fault-fraction", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray-address", default=None,
                   help="cluster to join; default: a local one (RAY_ADDRESS is honoured)")
    args = p.parse_args(argv)
    if args.ray_address is None and "RAY_ADDRESS" not in os.environ:
        args.ray_address = "local"  # never follow a stale cluster file for a demo

    from align_ray.data import pipeline
    from align_ray.data.config import DataConfig
    from align_ray.web.server import NoisyWeb

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with NoisyWeb(seed=args.seed) as web:
        rows = web.url_rows(args.rows, noise=True, faults=True, fault_fraction=args.fault_fraction)
        urls = web.write_url_list(out / "urls.parquet", rows)
        print(f"noisy web on {web.base_url}: {len(rows)} URLs -> {urls}", flush=True)
        cfg = DataConfig(input=str(urls), output=str(out / "data"), overwrite=True, shard_size=200,
                         extra_cols=["noise", "fault"], allow_cidr=["127.0.0.0/8"],
                         resolve={"internal.test": "10.0.0.1"},
                         timeout_read=5, timeout_total=10, retries=1,
                         max_per_host=64)  # one host standing in for a web: no per-host cap
        ray_env.init(args.ray_address)
        t0 = time.time()
        stats = pipeline.run(cfg)
    print(pipeline.summary_line(stats))
    print(json.dumps({k: stats[k] for k in ("input_rows", "output_rows", "dropped")}, indent=1))
    print(f"done in {time.time() - t0:.1f}s: samples in {cfg.output}/parquet and "
          f"{cfg.output}/webdataset, dropped rows in {cfg.output}/dropped, "
          f"totals in {cfg.output}/stats.json")
    return 0
