#!/usr/bin/env python
"""Ray Train's controller poll interval (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``): Ray's default
2 s against the 0.5 s that ``align-ray train`` sets (``train/resilience.controller_polls``).

Each run is the whole ``align-ray train`` process as a user runs it, on the shared dev set, with
its own local Ray (``--ray-address local``): wall time, the "fit done in" time the CLI logs,
and the CPU seconds of Ray Train's controller actor (the process that polls).  The two
settings alternate within each round, so a slow period of the machine hits both.

    .venv/bin/python benchmarks/bench_train_poll.py --rounds 3 --steps 3 \\
        --json benchmarks/results/train-poll-DATE.json
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (DEV_SET, REPO, CpuSampler, machine, prepare_env,  # noqa: E402
                           settle, write_json)
SETTINGS = ("2", "0.5")


def one_run(poll: str, steps: int, work: Path, env: dict) -> dict:
    out = work / f"run-{poll}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "align_ray.cli", "train", "--data", str(DEV_SET),
           "--image-col", "image", "--text-col", "alt_text", "--output", str(out),
           "--batch-size", "8", "--steps", str(steps), "--ray-address", "local"]
    settle()
    t0 = time.monotonic()
    with CpuSampler(None) as cpu:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll})
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({poll}):\n{proc.stderr[-3000:]}")
    fit = re.search(r"fit done in ([0-9.]+)s", proc.stderr + proc.stdout)
    controller = sum(c - cpu.first.get(pid, 0.0) for pid, c in cpu.last.items()
                     if "TrainController" in cpu.info.get(pid, (0, ""))[1])
    return {"poll_s": float(poll), "wall_s": round(wall, 2),
            "fit_s": float(fit.group(1)) if fit else None,
            "controller_cpu_s": round(controller, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-poll-") as tmp:
        work = Path(tmp)
        env = {**prepare_env(work), "PYTHONPATH": str(REPO)}
        runs = []
        for r in range(args.rounds):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            for poll in order:
                row = {"round": r, **one_run(poll, args.steps, work, env)}
                runs.append(row)
                print(f"round {r} poll {poll:>3} s: wall {row['wall_s']:6.2f} s, fit "
                      f"{row['fit_s']} s, controller CPU {row['controller_cpu_s']} s", flush=True)
    medians = {}
    for poll in SETTINGS:
        mine = [x for x in runs if x["poll_s"] == float(poll)]
        medians[poll] = {k: statistics.median(x[k] for x in mine)
                         for k in ("wall_s", "fit_s", "controller_cpu_s")}
        print(f"poll {poll:>3} s: median wall {medians[poll]['wall_s']:.2f} s, fit "
              f"{medians[poll]['fit_s']:.2f} s, controller CPU "
              f"{medians[poll]['controller_cpu_s']:.2f} s")
    if args.json:
        write_json(args.json, {"machine": machine(), "steps": args.steps, "runs": runs,
                               "medians": medians,
                               "command": "python benchmarks/bench_train_poll.py "
                                          + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
