#!/usr/bin/env python
"""What would the whole ``align-ray data`` process gain without Ray Data?  A measurement
prototype, not the product.

The download stage runs its shards through Ray Data (``pipeline.run``: ``from_items`` ->
``map_batches(ShardDownloader)`` on an actor pool), which brings Ray Data's import (about a
core-second per process that touches it: the driver and every map worker) and three helper
actors of its own (stats, autoscaling coordinator, actor locations).  ``--child plain`` runs
the real CLI (``cli.main``) with ``pipeline.run`` swapped for the same plan and the same
``ShardDownloader.process`` calls on plain Ray actors (one per CPU, ``shards_per_actor`` calls
each at once), and the stall watchdog, which reads Ray Data's executor, off.  Everything else
(flags, Ray start and stop, plan, markers, stats.json) is the CLI's.

The harness alternates, per round, the real CLI, the prototype and img2dataset on one URL list
served by the benchmark's web server, all with the same settings as ``bench_download.py``
(equal downloads in flight), and reports whole-process wall time and machine busy core-seconds.

    .venv/bin/python benchmarks/download_executor_ab.py --repeats 5 --json benchmarks/results/download-executor-ab-DATE.json
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def plain_run(cfg):
    """``pipeline.run`` with plain Ray actors in place of Ray Data (no watchdog, no retries
    of a lost actor: a prototype to measure, nothing more)."""
    import ray

    from align_ray.data import pipeline
    from align_ray.data.downloader import ShardDownloader
    from align_ray.layout import Layout

    class Runner:
        def __init__(self, cfg):
            self.dl = ShardDownloader(cfg)

        def run(self, specs: str) -> list[dict]:
            return [self.dl.process(str(s), int(f), int(g), bool(r))
                    for s, f, g, r in json.loads(specs)]

    t0 = time.time()
    layout = Layout(cfg.output)
    if cfg.overwrite:
        layout.clear()
    plan = pipeline.ensure_plan(cfg, layout)   # before the actors: its task needs a CPU
    markers = layout.markers()
    todo = [item["specs"] for item in pipeline.work_items(plan, markers, cfg.retry_failed)]
    n, spa = pipeline._actors(cfg), max(1, cfg.shards_per_actor)
    actors = [ray.remote(num_cpus=1, max_concurrency=spa)(Runner).remote(cfg) for _ in range(n)]
    free, inflight, rows = {i: spa for i in range(n)}, {}, 0
    while todo or inflight:
        for i in range(n):
            while free[i] and todo:
                inflight[actors[i].run.remote(todo.pop(0))] = i
                free[i] -= 1
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            free[inflight.pop(ref)] += 1
            for info in ray.get(ref):
                markers[info["shard"]] = info
                rows += info["input_rows"]
    seconds = time.time() - t0
    stats = pipeline.summarize(plan, markers, seconds, cfg)
    stats["rows_per_s_this_run"] = round(rows / seconds, 1)
    layout.write_stats(stats)
    return stats


def child(argv: list[str]) -> int:
    from align_ray import cli, watchdog
    from align_ray.data import pipeline

    pipeline.run = plain_run
    watchdog.install = lambda *a, **k: None
    return cli.main(argv)


def main() -> int:
    from _bench_common import REPO, WebServer, machine, machine_busy_seconds, prepare_env
    from _bench_tools import run_img2dataset
    from bench_download import build_parser

    p = build_parser()
    p.description = __doc__.split("\n\n")[0]
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="executor-ab-"))
    env = prepare_env(work)
    logs = work / "logs"
    logs.mkdir()
    (work / "cfg.yaml").write_text("max_per_host: 256\n")   # as bench_download's ours_config
    web = WebServer(work / "urls.parquet", args.rows, args.pool_size,
                    tuple(args.image_size_range), args.seed).start()
    exe = {"ours-cli": [str(Path(sys.executable).with_name("align-ray"))],
           "ours-plain-actors": [sys.executable, __file__, "--child"]}
    tools = ["ours-cli", "ours-plain-actors", "img2dataset"]
    runs = []
    try:
        for rnd in range(args.repeats):
            for tool in tools[rnd % 3:] + tools[:rnd % 3]:
                out = work / f"r{rnd}-{tool}"
                time.sleep(3)
                b0 = machine_busy_seconds()
                if tool == "img2dataset":
                    res = run_img2dataset(args, web.url_list, out, env, logs)
                else:
                    cmd = exe[tool] + [
                        "data", "--input", str(web.url_list), "--output", str(out),
                        "--image-size", "256", "--resize-mode", "center_crop",
                        "--allow-cidr", "127.0.0.0/8", "--processes", str(args.processes),
                        "--threads", "32", "--shard-size", str(args.shard_size),
                        "--config", str(work / "cfg.yaml"), "--ray-address", "local"]
                    t0 = time.time()
                    subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=args.run_timeout,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    stats = json.loads((out / "stats.json").read_text())
                    res = {"wall_s": time.time() - t0, "ok": stats["output_rows"]}
                res.update(tool=tool, round=rnd, busy_core_s=round(machine_busy_seconds() - b0, 2),
                           wall_s=round(res["wall_s"], 3))
                runs.append({k: res[k] for k in ("tool", "round", "ok", "wall_s", "busy_core_s")})
                print(json.dumps(runs[-1]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        web.stop()
    med = {t: {k: statistics.median(r[k] for r in runs if r["tool"] == t)
               for k in ("wall_s", "busy_core_s")} for t in tools}
    i2d = med["img2dataset"]["wall_s"]
    ratios = {t: round(i2d / med[t]["wall_s"], 3) for t in tools[:2]}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "command": sys.argv, "rows": args.rows, "runs": runs, "medians": med,
              "images_per_s_ratio_vs_img2dataset": ratios}
    print(json.dumps({"medians": med, "ratios": ratios}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
