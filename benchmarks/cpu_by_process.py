"""CPU time of every process on the box, summed by what the process is, while a command runs
(or until SIGTERM/SIGINT when no command is given).

    python benchmarks/cpu_by_process.py OUT.json -- bash tests/run_all.sh -k kill
    python benchmarks/cpu_by_process.py OUT.json &     # ... then kill -TERM it

Every second it reads each process's user + system time; a process's growth since the last
look goes to its category *now* (a Ray worker is "ray::IDLE" while it starts and imports, then
"ray::ClassName.method").  Processes alive at the start count from the start; a process that
lives less than a second between two looks is missed, and a child's time reaped by its parent
is not added to the parent.  Out: elapsed s, the box's idle core-s, and core-s per category.
Used for BENCHMARKS.md "CI time" (where the suite's CPU goes).
"""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import time

import psutil


def category(p: psutil.Process) -> str | None:
    try:
        cmd = " ".join(p.cmdline())[:300]
        name = p.name()
    except psutil.Error:
        return None
    if not cmd:
        return name                      # kernel threads
    exe = cmd.split(" ")[0]
    for frag, cat in (("raylet", "raylet"), ("gcs_server", "gcs_server")):
        if frag in exe:
            return cat
    for frag, cat in (("dashboard/agent.py", "dashboard_agent"), ("runtime_env", "runtime_env_agent"),
                      ("dashboard/dashboard.py", "dashboard_head"), ("log_monitor", "log_monitor"),
                      ("monitor.py", "autoscaler_monitor")):
        if frag in cmd:
            return cat
    if cmd.startswith("ray::"):
        m = re.match(r"ray::([A-Za-z_:.]+)", cmd)
        t = m.group(1) if m else "?"
        return "ray::" + ("ServeReplica:" + t.split(":")[-1] if t.startswith("ServeReplica") else t)
    if "default_worker.py" in cmd:
        return "ray::(starting)"
    for frag, cat in (("pytest", "pytest"), ("weed", "seaweedfs"), ("chrom", "chromium"),
                      ("align_ray.cli", "cli_driver")):
        if frag in cmd:
            return cat
    if "python" in cmd:
        return "python:" + " ".join(cmd.split(" ")[1:3])[:60]
    return name


def main(argv: list[str]) -> int:
    out, cmd = argv[0], argv[2:] if argv[1:2] == ["--"] else []
    stop = False

    def bye(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    me = psutil.Process().pid
    proc = subprocess.Popen(cmd) if cmd else None
    last: dict = {}
    tot: collections.Counter = collections.Counter()
    t0, idle0, first = time.time(), psutil.cpu_times().idle, True
    while not stop and (proc is None or proc.poll() is None):
        for p in psutil.process_iter():
            if p.pid == me:
                continue
            try:
                ct, key = p.cpu_times(), (p.pid, p.create_time())
            except psutil.Error:
                continue
            c, cat = ct.user + ct.system, category(p)
            prev = last.setdefault(key, c if first else 0.0)
            last[key] = c
            if cat is not None:
                tot[cat] += c - prev
        first = False
        time.sleep(1)
    report = {"command": cmd, "returncode": proc.returncode if proc else None,
              "elapsed_s": round(time.time() - t0, 1),
              "idle_core_s": round(psutil.cpu_times().idle - idle0, 1),
              "by_category_core_s": {k: round(v, 1) for k, v in tot.most_common() if v >= 0.05}}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return proc.returncode if proc else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
