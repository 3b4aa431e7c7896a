#!/usr/bin/env python
"""Where the fixed cost of a standalone ``align-ray data`` goes: phase timestamps of the whole
process and CPU seconds per process it starts, with the CLI's lean Ray start
(``ray_env.init_for_command``, the default) and, alternating with it, with a plain
``ray_env.init`` (Ray's defaults: dashboard, Ray's own exit hook).

A short URL list (default 400 URLs in 4 shards of 100) keeps the downloads small, so what is
left is the fixed cost.  Each run is ``align-ray data ... --ray-address local`` in a fresh
process (``python benchmarks/profile_cli.py --child VARIANT -- ARGS`` runs ``cli.main(ARGS)``
with timestamps), polled every 50 ms for the CPU of every process descending from it.

Phases of one run, in seconds from the process start:

* ``imports``: interpreter up, ``align_ray.cli`` and the data stage imported;
* ``ray_init``: ``ray_env.init*`` (GCS, raylet, dashboard process, agents);
* ``to_first_shard``: from ``pipeline.run`` to the first shard starting (plan task, Ray Data
  planning, its helper actors, the download actors' start and imports);
* ``shards``: first shard start to ``pipeline.run`` returning;
* ``exit``: ``main`` returning to the process being gone (Ray shutdown, interpreter exit).

    .venv/bin/python benchmarks/profile_cli.py --rounds 3 --json benchmarks/results/cli-fixed-cost-DATE.json
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, CpuSampler, WebServer, machine, prepare_env  # noqa: E402

VARIANTS = ("lean", "ray-defaults")


# --------------------------------------------------------------------------- child process
def child(variant: str, cli_args: list[str]) -> int:
    t0 = float(os.environ["PROFILE_T0"])
    marks_file = Path(os.environ["PROFILE_MARKS"])

    def mark(name: str) -> None:
        with open(marks_file, "a") as fh:
            fh.write(json.dumps({name: round(time.time() - t0, 3)}) + "\n")

    mark("python_up")
    import atexit

    from align_ray import cli, ray_env
    from align_ray.data import pipeline

    mark("imports")
    if variant == "ray-defaults":
        ray_env.init_for_command = ray_env.init  # Ray's defaults and its own exit hook
    init_for_command = ray_env.init_for_command

    def timed_init(*a, **k):
        mark("init_start")
        init_for_command(*a, **k)
        mark("init_end")
        atexit.register(mark, "exit_handlers")  # runs first of the exit handlers (LIFO)

    ray_env.init_for_command = timed_init
    run = pipeline.run

    def timed_run(cfg):
        mark("run_start")
        stats = run(cfg)
        mark("run_end")
        return stats

    pipeline.run = timed_run
    rc = cli.main(cli_args)
    mark("main_returned")
    return rc


# --------------------------------------------------------------------------- parent
def _name(cmd: str) -> str:
    """A short process name: Ray's process title (ray::X, raylet, gcs_server) or the script."""
    if not cmd:
        return "?"
    first = cmd.split()[0]
    if first.startswith("ray::") or first.startswith("ray-dashboard-"):
        return first.split("(")[0] if "MapWorker" not in first else first
    base = first.rsplit("/", 1)[-1]
    if base.startswith("python"):
        parts = cmd.split()
        script = next((p for p in parts[1:] if p.endswith(".py")), None)
        if script:
            return script.rsplit("/", 1)[-1]
        if "-c" in parts:
            return "python -c (dashboard module / helper)"
        return " ".join(parts[1:3])
    return base


def one_run(variant: str, url_list: Path, out: Path, env: dict, work: Path,
            timeout: float) -> dict:
    marks_file = work / f"marks-{out.name}.jsonl"
    args = ["data", "--input", str(url_list), "--output", str(out), "--image-size", "256",
            "--resize-mode", "center_crop", "--allow-cidr", "127.0.0.0/8", "--processes", "2",
            "--shard-size", "100", "--ray-address", "local"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--", *args]
    t0 = time.time()
    with open(work / f"{out.name}.log", "w") as log, CpuSampler(None, interval=0.05) as cpu:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**env, "PROFILE_T0": repr(t0), "PROFILE_MARKS": str(marks_file)})
        root = proc.pid
        rc = proc.wait(timeout)
    wall = time.time() - t0
    marks: dict[str, float] = {}
    for line in marks_file.read_text().splitlines():
        marks.update(json.loads(line))
    first_shard = None
    for marker in (out / "_shards").glob("*.json"):
        info = json.loads(marker.read_text())
        start = marker.stat().st_mtime - info["seconds"] - t0
        first_shard = start if first_shard is None else min(first_shard, start)

    def descends(pid: int) -> bool:
        seen = set()
        while pid in cpu.info and pid not in seen:
            if pid == root:
                return True
            seen.add(pid)
            pid = cpu.info[pid][0]
        return False

    by_name: dict[str, float] = {}
    for pid, last in cpu.last.items():
        if descends(pid):
            name = _name(cpu.info.get(pid, (0, ""))[1])
            by_name[name] = by_name.get(name, 0.0) + last - cpu.first.get(pid, 0.0)
    by_name = {k: round(v, 2) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])
               if v >= 0.01}
    phases = {"imports": marks.get("imports"),
              "ray_init": marks["init_end"] - marks["init_start"],
              "to_first_shard": (first_shard or marks["run_end"]) - marks["run_start"],
              "shards": marks["run_end"] - (first_shard or marks["run_end"]),
              "exit": wall - marks["main_returned"]}
    return {"variant": variant, "rc": rc, "wall_s": round(wall, 2), "marks_s": marks,
            "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "cpu_s_total": round(sum(by_name.values()), 2), "cpu_s_by_process": by_name,
            "load_avg_1m_before": None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="profile-cli-"))
    env = prepare_env(work)
    web = WebServer(work / "urls.parquet", args.rows, 128, (640, 1024))
    runs = []
    try:
        web.start()
        for rnd in range(args.rounds):
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                load = os.getloadavg()[0]
                res = one_run(variant, web.url_list, work / f"r{rnd}-{variant}", env, work,
                              args.run_timeout)
                res.update(round=rnd, load_avg_1m_before=round(load, 2))
                runs.append(res)
                print(f"round {rnd} {variant:<12} rc {res['rc']} wall {res['wall_s']:6.2f}s  "
                      + "  ".join(f"{k} {v:.2f}" for k, v in res["phases_s"].items())
                      + f"  cpu {res['cpu_s_total']:.1f}s  load {load:.1f}", flush=True)
                if args.json:  # every finished run is kept, even if a later one fails
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(
                        {"partial": True, "command": " ".join(argv), "rows": args.rows,
                         "runs": runs}, indent=1))
    finally:
        web.stop()
    medians = {}
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        if not rs:
            continue
        names = sorted({n for r in rs for n in r["cpu_s_by_process"]})
        medians[variant] = {
            "wall_s": round(statistics.median(r["wall_s"] for r in rs), 2),
            "phases_s": {k: round(statistics.median(r["phases_s"][k] for r in rs), 2)
                         for k in rs[0]["phases_s"]},
            "cpu_s_total": round(statistics.median(r["cpu_s_total"] for r in rs), 2),
            "cpu_s_by_process": dict(sorted(
                ((n, round(statistics.median(r["cpu_s_by_process"].get(n, 0.0) for r in rs), 2))
                 for n in names), key=lambda kv: -kv[1]))}
    for variant, m in medians.items():
        print(f"\n{variant}: median wall {m['wall_s']:.2f}s, phases "
              + ", ".join(f"{k} {v:.2f}" for k, v in m["phases_s"].items())
              + f"; CPU {m['cpu_s_total']:.1f}s:")
        for name, v in m["cpu_s_by_process"].items():
            if v >= 0.05:
                print(f"  {v:6.2f}  {name}")
    report = {"date": time.strftime("%Y-%m-%d"),
              "command": " ".join([Path(sys.executable).name, "benchmarks/profile_cli.py", *argv]),
              "machine": machine(), "rows": args.rows, "runs": runs, "medians": medians}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"results written to {args.json}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
