#!/usr/bin/env python
"""What the per-row politeness checks cost one download actor, without Ray: the actor's own
async path (``ShardDownloader._download_all``) over ``--rows`` URLs of the built-in noisy web
(one host), timed in wall and in this process's CPU seconds (fetch loop + decode threads).

Run it once per code version and compare, alternating, e.g. the commit before the polite
downloader checked out in a worktree (``PYTHONPATH=WORKTREE``) against this one:

    .venv/bin/python benchmarks/bench_polite_overhead.py --rows 2000 --repeats 5 \\
        --set max_per_host=256

``--set`` fields a version does not know are skipped (so the same command runs on both).
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import pyarrow as pa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json")
    args = p.parse_args()

    from align_ray.data.config import DataConfig
    from align_ray.data.downloader import ShardDownloader
    from align_ray.web.server import NoisyWeb

    known = {f.name: f.type for f in dataclasses.fields(DataConfig)}
    extra = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k in known:
            extra[k] = json.loads(v) if v[:1] in "0123456789[{tf-" else v
    with NoisyWeb(seed=0, photo_like=True, image_size_range=(640, 1024), pool_size=128) as web:
        urls = [r["url"] for r in web.url_rows(args.rows, noise=False)]
        rows = pa.table({"key": [f"{i:014d}" for i in range(len(urls))], "url": urls,
                         "text": ["x"] * len(urls)})
        cfg = DataConfig(output="/tmp/bench-polite-unused", allow_cidr=["127.0.0.0/8"],
                         threads=args.threads, image_size=256, **extra)
        dl = ShardDownloader(cfg)
        dl._run(dl._download_all(rows.slice(0, 100), None))   # warm: imports, connections
        runs = []
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            result, _ = dl._run(dl._download_all(rows, None))
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            ok = len(result.samples["key"])
            runs.append({"ok": ok, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                         "images_per_s": round(ok / wall, 1),
                         "cpu_ms_per_image": round(1000 * cpu / max(ok, 1), 3),
                         "load1": os.getloadavg()[0]})
            print(json.dumps(runs[-1]), flush=True)
    summary = {k: statistics.median(r[k] for r in runs)
               for k in ("images_per_s", "cpu_ms_per_image", "wall_s")}
    print("median", json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "config_set": extra, "runs": runs,
                       "median": summary}, f, indent=1)


if __name__ == "__main__":
    main()
