#!/usr/bin/env python
"""Download stage vs img2dataset, side by side, in one run, on the same URL list.

What one run does:

1. starts the built-in noisy web (``python -m align_ray.web``) in a separate process:
   photo-like JPEGs, 640-1024 px, a pre-rendered pool, faults and noise off, and has it write
   a URL list of ``--rows`` rows;
2. for ``ours-stage``, starts a local Ray cluster in this process (untimed, plus an untimed
   200-URL warm-up job), as a job on an already running cluster would find it; it is shut
   down while the two commands run, because a second local cluster starts several seconds
   slower while another one is up;
3. for ``--repeats`` rounds runs every tool of ``--tools`` (order rotating every round), each
   into a fresh output folder and with the same number of processes:
   ``ours-stage`` (``pipeline.run`` on the running cluster), ``ours-cli`` (``align-ray data
   --ray-address local``, which starts and stops its own Ray) and ``img2dataset``;
4. prints per-run images ok / wall seconds / images/s / busy core-seconds, the medians, CPU per
   process group and the ratios ours / img2dataset, and writes all of it to ``--json``.

All traffic stays on 127.0.0.1 (see ``_bench_common.prepare_env``).

Example (the figures in BENCHMARKS.md; about 3 minutes on the 2-core box):

    timeout 1200 .venv/bin/python benchmarks/bench_download.py --json /tmp/bench_download.json

``--ours-set KEY=VALUE`` (repeatable) sets any DataConfig field of both of our runs (e.g.
``--ours-set shards_per_actor=1``); ``--tools ours-stage,img2dataset`` picks the tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (REPO, CpuSampler, WebServer, machine, machine_busy_seconds,  # noqa: E402
                           prepare_env, settle, versions, wait_while_running)
from _bench_tools import (Cluster, img2dataset_cmd, ours_config, parse_overrides,  # noqa: E402
                          run_img2dataset, run_ours_cli, run_ours_stage)

TOOLS = ("ours-stage", "ours-cli", "img2dataset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000, help="URLs in the list (default 4000)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every tool (default 3)")
    p.add_argument("--processes", type=int, default=2,
                   help="download processes of both tools (our actors, img2dataset's workers)")
    p.add_argument("--i2d-threads", type=int, default=32, help="img2dataset --thread_count")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="rows per shard for both (our shard_size, img2dataset "
                        "--number_sample_per_shard)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a DataConfig field of our stage (repeatable; overrides --shard-size)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated subset of {','.join(TOOLS)}")
    p.add_argument("--pool-size", type=int, default=128, help="distinct pre-rendered pictures")
    p.add_argument("--image-size-range", type=int, nargs=2, default=(640, 1024),
                   metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-for", default="pytest", metavar="PATTERN",
                   help="before each run, wait while a process whose command line holds PATTERN "
                        "runs (default: pytest; '' = never); runs it overlaps are flagged")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed 200-URL run of each tool before the first round")
    p.add_argument("--img2dataset", default=str(REPO / ".venv-img2dataset" / "bin" / "img2dataset"))
    p.add_argument("--run-timeout", type=float, default=600, help="seconds per command run")
    p.add_argument("--workdir", help="where URL list, outputs and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (outputs, logs)")
    p.add_argument("--json", help="write all results here")
    return p


def write_subset(src: Path, dst: Path, n: int) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(src).slice(0, n), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(tools) - set(TOOLS):
        raise SystemExit(f"--tools: unknown {sorted(unknown)}")
    if "img2dataset" in tools and not Path(args.img2dataset).exists():
        raise SystemExit(f"{args.img2dataset} not found: run benchmarks/setup_img2dataset.sh")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-download-")).resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = prepare_env(workdir)  # before anything imports Ray
    args.ours_overrides = parse_overrides(args.ours_set)

    web = WebServer(workdir / "urls.parquet", args.rows, args.pool_size,
                    tuple(args.image_size_range), args.seed)
    cluster = Cluster(args.processes)
    results: list[dict] = []
    try:
        t = time.time()
        web.start().check()
        print(f"web server {web.base_url} (pid {web.proc.pid}) up in {time.time() - t:.1f}s, "
              f"{args.rows} URLs in {web.url_list}", flush=True)
        small = write_subset(web.url_list, workdir / "warmup.parquet", min(200, args.rows))

        def once(tool: str, url_list: Path, out: Path) -> dict:
            if tool == "ours-stage":
                if not cluster.is_up():
                    cluster.up()
                    if not args.no_warmup:  # a running cluster has run a Ray Data job before
                        res = run_ours_stage(args, small, workdir / f"warmup-{cluster.starts}")
                        print(f"  (warm-up job {res['ok']} images {res['wall_s']:.1f}s)",
                              flush=True)
                return run_ours_stage(args, url_list, out)
            cluster.down()  # a second local cluster starts slower while one is up (ports)
            if tool == "ours-cli":
                return run_ours_cli(args, url_list, out, env, logs)
            return run_img2dataset(args, url_list, out, env, logs)

        if not args.no_warmup and "img2dataset" in tools:  # page cache of its venv
            res = once("img2dataset", small, workdir / "warmup-img2dataset")
            print(f"warm-up img2dataset: {res['ok']}/{min(200, args.rows)} in "
                  f"{res['wall_s']:.1f}s", flush=True)

        for rnd in range(args.repeats):
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
            for tool in order:
                out = workdir / f"r{rnd}-{tool}"
                wait_while_running(args.wait_for)
                if tool == "ours-stage" and not cluster.is_up():
                    once(tool, small, workdir / f"warmup-r{rnd}")  # brings the cluster up
                elif tool != "ours-stage":
                    cluster.down()  # before the clock: the commands start a cluster of their own
                settle()
                load = os.getloadavg()[0]
                busy0, srv0 = machine_busy_seconds(), web.cpu_seconds()
                with CpuSampler(web.proc.pid) as cpu:
                    res = once(tool, web.url_list, out)
                res.update(busy_core_s=round(machine_busy_seconds() - busy0, 2),
                           server_cpu_s=round(web.cpu_seconds() - srv0, 2),
                           cpu_s_by_group=cpu.by_group(), cpu_s_other_top=cpu.top_other(),
                           disturbed_by=cpu.matching(args.wait_for),
                           round=rnd, tool=tool, rows=args.rows, wall_s=round(res["wall_s"], 3),
                           load_avg_1m_before=round(load, 2),
                           images_per_s=round(res["ok"] / res["wall_s"], 1))
                results.append(res)
                print(f"round {rnd} {tool:<12} {res['ok']:>6}/{args.rows} ok  "
                      f"{res['wall_s']:7.2f}s  {res['images_per_s']:7.1f} images/s  "
                      f"busy {res['busy_core_s']:.1f} core-s (server {res['server_cpu_s']:.1f})"
                      + ("" if res["ok"] == args.rows else
                         f"  FAILURES: {fmt_failures(res['failures'])}")
                      + ("" if res["sha256_column"] else "  NO sha256 COLUMN")
                      + (f"  [start {res['phases_s']['start']:.1f}s, stage "
                         f"{res['phases_s']['stage']:.1f}s, exit {res['phases_s']['exit']:.1f}s]"
                         if "phases_s" in res else "")
                      + f"  load {load:.1f}"
                      + (f"  DISTURBED by {res['disturbed_by']}" if res["disturbed_by"] else ""),
                      flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                if args.json:  # every finished run is kept, even if a later one fails
                    write_json(args.json, {**summarize(args, argv, tools, results, workdir),
                                           "partial": True})
    finally:
        cluster.down()
        web.stop()

    report = summarize(args, argv, tools, results, workdir)
    print_report(report)
    if args.json:
        write_json(args.json, report)
        print(f"\nresults written to {args.json}")
    if args.keep:
        print(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["ok"] >= 0.99 * r["rows"] and not r["disturbed_by"] for r in results) else 1


def write_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1, default=str))


def fmt_failures(failures: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])) or "-"


def _median_per_1k(runs: list[dict], value) -> float:
    return round(statistics.median(1000 * value(r) / max(r["ok"], 1) for r in runs), 2)


def summarize(args, argv, tools, results, workdir) -> dict:
    medians = {}
    for tool in tools:
        runs = [r for r in results if r["tool"] == tool]
        if not runs:
            continue
        groups = sorted({g for r in runs for g in r["cpu_s_by_group"]})
        medians[tool] = {
            "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "ok_fraction": round(min(r["ok"] for r in runs) / args.rows, 4),
            "busy_core_s_per_1k": _median_per_1k(runs, lambda r: r["busy_core_s"]),
            "images_per_s_range": [min(r["images_per_s"] for r in runs),
                                   max(r["images_per_s"] for r in runs)],
            "cpu_s_per_1k_by_group": {
                g: _median_per_1k(runs, lambda r, g=g: r["cpu_s_by_group"].get(g, 0.0))
                for g in groups}}
        if all("phases_s" in r for r in runs):
            medians[tool]["phases_s"] = {
                k: round(statistics.median(r["phases_s"][k] for r in runs), 2)
                for k in runs[0]["phases_s"]}
    ratios, per_round = {}, {}
    base = medians.get("img2dataset", {}).get("images_per_s")
    for tool in ("ours-stage", "ours-cli"):
        if base and tool in medians:
            ratios[f"{tool}/img2dataset"] = round(medians[tool]["images_per_s"] / base, 2)
            pairs = [(a["images_per_s"], b["images_per_s"]) for a in results for b in results
                     if a["tool"] == tool and b["tool"] == "img2dataset"
                     and a["round"] == b["round"]]
            per_round[f"{tool}/img2dataset"] = [round(x / y, 2) for x, y in pairs]
    ours = {k: v for k, v in vars(ours_config(args, Path("-"), Path("-"))).items()
            if k not in ("input", "output")}
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_download.py", *argv]),
        "machine": machine(),
        "versions": versions(args.img2dataset if "img2dataset" in tools else None),
        "settings": {
            "rows": args.rows, "repeats": args.repeats, "processes": args.processes,
            "img2dataset_threads": args.i2d_threads, "shard_size": args.shard_size,
            "ours_overrides": args.ours_overrides, "ours_config": ours,
            "img2dataset_command": img2dataset_cmd(args, Path("URLS"), Path("OUT")),
            "web": {"photo_like": True, "image_size_range": list(args.image_size_range),
                    "pool_size": args.pool_size, "noise": False, "faults": False,
                    "server_backlog": "library default", "seed": args.seed},
            "tools": tools},
        "runs": results,
        "medians": medians,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "workdir": str(workdir) if args.keep else None,
    }


def shard_overlap(shards: list[dict]) -> tuple[int, float]:
    """(most shards in progress at once, seconds from start to the first shard starting)."""
    events = sorted([(s["start_s"], 1) for s in shards] + [(s["end_s"], -1) for s in shards])
    cur = most = 0
    for _, step in events:
        cur += step
        most = max(most, cur)
    return most, min((s["start_s"] for s in shards), default=0.0)


def print_report(report: dict) -> None:
    print("\nper run (busy = whole machine incl. web server; par = most shards in progress at "
          "once; 1st = s until the first shard started):")
    print(f"  {'round':>5}  {'tool':<12} {'ok':>11} {'wall s':>8} {'images/s':>9} "
          f"{'busy core-s/1k':>14} {'par':>4} {'1st':>5}")
    for r in report["runs"]:
        par, first = shard_overlap(r["shards"])
        print(f"  {r['round']:>5}  {r['tool']:<12} {r['ok']:>5}/{r['rows']:<5} "
              f"{r['wall_s']:>8.2f} {r['images_per_s']:>9.1f} "
              f"{1000 * r['busy_core_s'] / max(r['ok'], 1):>14.2f} {par:>4} {first:>5.1f}"
              + ("  DISTURBED" if r.get("disturbed_by") else ""))
    print("\nmedians:")
    for tool, m in report["medians"].items():
        print(f"  {tool:<12} {m['images_per_s']:>8.1f} images/s  ({m['wall_s']:.2f}s wall, "
              f"{m['busy_core_s_per_1k']:.2f} busy core-s per 1k images, "
              f"min ok {100 * m['ok_fraction']:.1f}%)")
    print("\nCPU seconds per 1000 images, by process group (medians):")
    for tool, m in report["medians"].items():
        groups = sorted(m["cpu_s_per_1k_by_group"].items(), key=lambda kv: -kv[1])
        print(f"  {tool:<12} " + ", ".join(f"{g} {v:.2f}" for g, v in groups if v >= 0.01))
    print()
    for name, ratio in report["ratios"].items():
        print(f"  ratio {name}: {ratio:.2f}x (per round: "
              f"{', '.join(f'{x:.2f}' for x in report['ratios_per_round'].get(name, []))})")
    for tool, m in report["medians"].items():
        if "phases_s" in m:
            print(f"  {tool} phases (medians, s): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in m["phases_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
