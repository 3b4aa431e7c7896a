#!/usr/bin/env python
"""Download stage vs img2dataset, side by side, in one run, on the same URL list.

What one run does:

1. starts the built-in noisy web (``align_ray.web``) in a *separate process* (so its GIL does
   not slow the clients): photo-like JPEGs, 640-1024 px, a pre-rendered pool, faults and noise
   off, and has it write a URL list of ``--rows`` rows;
2. for ``ours-stage``, starts a local Ray cluster in this process (``ray.init(address="local")``,
   untimed, plus an untimed 200-URL warm-up job), as a job on an already running cluster would
   find it; it is shut down while the two commands run, because a second local cluster starts
   several seconds slower while another one is up;
3. for ``--repeats`` rounds runs, in an order that rotates every round, each into a fresh
   output folder and with the same number of processes:

   * ``ours-stage``: ``align_ray.data.pipeline.run`` on the running cluster (planning, actor
     start-up, download, decode, resize, sha256, parquet + webdataset writes);
   * ``ours-cli``: ``align-ray data --ray-address local`` as a command, so it also pays for
     starting (and stopping) a Ray cluster of its own;
   * ``img2dataset``: the ``img2dataset`` command (webdataset, sha256, center crop 256);

4. prints per-run images ok / wall seconds / images/s, the medians and the ratios ours /
   img2dataset, and writes them all to ``--json``.

Every process that may start Ray gets a ``HOME`` holding ``ray_bootstrap_config.yaml`` with a
local provider (otherwise Ray probes cloud metadata addresses) and ``RAY_AUTH_MODE=disabled``;
img2dataset gets wandb and the albumentations update check switched off.  All traffic stays on
127.0.0.1.

Server accept backlog: the built-in web is a ``ThreadingHTTPServer``, whose listen backlog is
Python's default of 5.  When 64+ clients connect at once the kernel drops handshakes beyond it
and the clients stall for 1-7 s of SYN/ACK retransmits, which measures the toy server, not the
clients.  By default the server is started with a backlog of 1024 (``--server-backlog``);
``--server-backlog 0`` keeps the library default to reproduce the stall.

Example (the figures in BENCHMARKS.md):

    timeout 1200 .venv/bin/python benchmarks/bench_download.py --json /tmp/bench_download.json

(about 3.5 minutes on the 2-core box: 9 timed runs of 10-21 s, warm-ups and server start.)

Tuning our stage: ``--ours-set KEY=VALUE`` (repeatable) sets any DataConfig field for both the
in-process and the CLI run (e.g. ``--ours-set shard_size=250 --ours-set threads=128``);
``--tools ours-stage,img2dataset`` picks which tools to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("ours-stage", "ours-cli", "img2dataset")


# --------------------------------------------------------------------------- environment
def prepare_env(workdir: Path) -> dict[str, str]:
    """Set (in os.environ, before Ray is imported) and return the environment for all runs."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    os.environ["HOME"] = str(home)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # img2dataset: no wandb, no albumentations version check over the network
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_DISABLED"] = "true"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    # a proxy from the environment must not see (or reroute) the 127.0.0.1 traffic
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    return dict(os.environ)


# --------------------------------------------------------------------------- web server
def serve_main(argv: list[str]) -> int:
    """``bench_download.py _serve BACKLOG [web args]``: the built-in web with a set backlog."""
    backlog, web_args = int(argv[0]), argv[1:]
    from align_ray.web import server

    if backlog > 0:
        server._Server.request_queue_size = backlog
    return server.main(web_args) or 0


class WebServer:
    """The built-in noisy web in a child process; writes the URL list, then serves until stop."""

    def __init__(self, url_list: Path, rows: int, pool_size: int, size_range: tuple[int, int],
                 backlog: int, seed: int):
        self.url_list = url_list
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "_serve", str(backlog),
                    "--host", "127.0.0.1", "--port", "0", "--rows", str(rows),
                    "--output", str(url_list), "--no-noise", "--photo-like",
                    "--pool-size", str(pool_size), "--image-size-range", *map(str, size_range),
                    "--seed", str(seed)]
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self, timeout: float = 180.0) -> "WebServer":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=REPO)
        lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:  # keeps draining the pipe so the server never blocks on it
            for line in self.proc.stdout:
                lines.append(line.rstrip())
                if line.startswith("serving "):
                    self.base_url = line.split()[1]
                if line.startswith("wrote "):
                    ready.set()
            ready.set()

        threading.Thread(target=pump, name="web-stdout", daemon=True).start()
        if ready.wait(timeout) and self.base_url and self.proc.poll() is None:
            return self
        self.stop()
        raise RuntimeError("web server did not start:\n" + "\n".join(lines[-20:]))

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------- CPU accounting
_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Core-seconds the whole machine spent not idle (all processes, from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK


def proc_cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / _TICK


class CpuSampler:
    """CPU seconds per process group during one run, polled from /proc (short-lived processes
    such as Ray actors are caught by polling every ``interval`` seconds; a process is counted
    with the tool it descends from, e.g. img2dataset's spawned workers)."""

    def __init__(self, server_pid: int | None, interval: float = 0.2):
        self.server_pid, self.interval = server_pid, interval
        self.me = os.getpid()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.info: dict[int, tuple[int, str]] = {}  # pid -> (ppid, cmdline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _snap(self, initial: bool = False) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()
            except OSError:
                continue
            cpu = (int(stat[11]) + int(stat[12])) / _TICK
            if pid not in self.first:
                self.first[pid] = cpu if initial else 0.0
            self.last[pid] = cpu
            if cmd or pid not in self.info:
                self.info[pid] = (int(stat[1]), cmd)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._snap()

    def __enter__(self) -> "CpuSampler":
        self._snap(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._snap()

    def _group(self, pid: int) -> str:
        cmd = self.info.get(pid, (0, ""))[1]
        if pid == self.server_pid:
            return "web_server"
        if pid == self.me:
            return "benchmark_driver"
        if "MapWorker" in cmd and "ShardDownloader" in cmd:
            return "ours_download_actors"
        seen, cur = set(), pid
        while cur in self.info and cur not in seen:  # img2dataset and its (spawned) workers
            seen.add(cur)
            if "img2dataset" in self.info[cur][1]:
                return "img2dataset"
            cur = self.info[cur][0]
        if "align-ray data" in cmd or "align_ray.cli" in cmd:
            return "ours_cli_driver"
        if "ray" in cmd:
            return "ray_system"
        return "other"

    def by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            group = self._group(pid)
            out[group] = out.get(group, 0.0) + cpu - self.first.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0.005}

    def top_other(self, n: int = 5) -> list[tuple[float, str]]:
        rows = [(round(cpu - self.first.get(pid, 0.0), 2), self.info.get(pid, (0, ""))[1][:100])
                for pid, cpu in self.last.items() if self._group(pid) == "other"]
        return sorted((r for r in rows if r[0] > 0.05), reverse=True)[:n]


# --------------------------------------------------------------------------- the tools
def ours_config(args: argparse.Namespace, url_list: Path, out: Path):
    from align_ray.data.config import DataConfig

    fields = dict(input=str(url_list), output=str(out), image_size=256,
                  resize_mode="center_crop", allow_cidr=["127.0.0.0/8"],
                  processes=args.processes, shard_size=args.shard_size)
    fields.update(args.ours_overrides)
    return DataConfig(**fields)


def ours_summary(out: Path, t_start: float) -> dict:
    """Images ok, drops and the per-shard timeline of one of our output folders."""
    stats = json.loads((out / "stats.json").read_text())
    shards = []
    for marker in sorted((out / "_shards").glob("*.json")):
        info = json.loads(marker.read_text())
        end = marker.stat().st_mtime - t_start
        shards.append({"shard": info["shard"], "start_s": round(end - info["seconds"], 2),
                       "end_s": round(end, 2), "rows": info["input_rows"]})
    sha_ok = _has_sha256(next(iter(sorted((out / "parquet").glob("*.parquet"))), None))
    return {"ok": stats["output_rows"], "failures": stats["dropped"], "shards": shards,
            "sha256_column": sha_ok, "stage_seconds": stats["seconds_this_run"]}


def _has_sha256(parquet: Path | None) -> bool:
    if parquet is None:
        return False
    import pyarrow.parquet as pq

    col = pq.read_table(parquet, columns=["sha256"]).column("sha256")
    return col.null_count == 0 and len(col) > 0 and len(col[0].as_py()) == 64


def run_ours_stage(args, url_list: Path, out: Path) -> dict:
    from align_ray.data import pipeline

    cfg = ours_config(args, url_list, out)
    t0 = time.time()
    pipeline.run(cfg)
    wall = time.time() - t0
    return {"wall_s": wall, **ours_summary(out, t0)}


def run_ours_cli(args, url_list: Path, out: Path, env: dict, logs: Path) -> dict:
    import yaml

    cfg_path = logs / f"{out.name}.yaml"
    cfg = ours_config(args, url_list, out)
    cfg_path.write_text(yaml.safe_dump(dict(args.ours_overrides)))  # fields without a flag
    exe = Path(sys.executable).with_name("align-ray")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "align_ray.cli"]) + [
        "data", "--input", str(url_list), "--output", str(out), "--image-size", "256",
        "--resize-mode", "center_crop", "--allow-cidr", "127.0.0.0/8",
        "--processes", str(cfg.processes), "--threads", str(cfg.threads),
        "--shard-size", str(cfg.shard_size), "--config", str(cfg_path), "--ray-address", "local"]
    log = logs / f"{out.name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                             timeout=args.run_timeout)
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"align-ray data exited {rc}; see {log}:\n{_tail(log)}")
    return {"wall_s": wall, "command": cmd, **ours_summary(out, t0)}


def img2dataset_cmd(args, url_list: Path, out: Path) -> list[str]:
    return [args.img2dataset, "--url_list", str(url_list), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
            "--output_folder", str(out), "--image_size", "256", "--resize_mode", "center_crop",
            "--processes_count", str(args.processes), "--thread_count", str(args.i2d_threads),
            "--compute_hash", "sha256", "--number_sample_per_shard", str(args.shard_size),
            "--distributor", "multiprocessing", "--enable_wandb", "False", "--retries", "0"]


def run_img2dataset(args, url_list: Path, out: Path, env: dict, logs: Path) -> dict:
    cmd = img2dataset_cmd(args, url_list, out)
    log = logs / f"{out.name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=out.parent,
                             timeout=args.run_timeout)
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"img2dataset exited {rc}; see {log}:\n{_tail(log)}")
    ok, failures, shards = 0, {}, []
    for path in sorted(out.glob("*_stats.json")):
        st = json.loads(path.read_text())
        ok += st["successes"]
        for reason, n in st.get("status_dict", {}).items():
            if reason != "success":
                failures[reason] = failures.get(reason, 0) + n
        shards.append({"shard": path.name.split("_")[0], "start_s": round(st["start_time"] - t0, 2),
                       "end_s": round(st["end_time"] - t0, 2), "rows": st["count"]})
    sha_ok = _has_sha256(next(iter(sorted(out.glob("*.parquet"))), None))
    return {"wall_s": wall, "command": cmd, "ok": ok, "failures": failures, "shards": shards,
            "sha256_column": sha_ok}


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# --------------------------------------------------------------------------- helpers
def versions(args) -> dict:
    import ray

    out = {"python": platform.python_version(), "ray": ray.__version__}
    for mod in ("aiohttp", "opencv-python-headless", "pillow", "pyarrow"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod)
        except Exception:  # noqa: BLE001 - informational only
            pass
    py = Path(args.img2dataset).with_name("python")
    try:
        out["img2dataset"] = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('img2dataset'), "
             "m.version('opencv-python-headless'))"],
            capture_output=True, text=True, timeout=60).stdout.split()[0]
    except Exception:  # noqa: BLE001
        out["img2dataset"] = "unknown"
    return out


def machine() -> dict:
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpus": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "cpu_model": model,
            "kernel": platform.release()}


def write_subset(src: Path, dst: Path, n: int) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(src).slice(0, n), dst)
    return dst


def check_server(url_list: Path, base_url: str) -> None:
    import pyarrow.parquet as pq

    urls = pq.read_table(url_list, columns=["url"]).column("url").to_pylist()
    bad = [u for u in urls if not u.startswith(base_url + "/")]
    if bad:
        raise RuntimeError(f"{len(bad)} URLs are not on {base_url}: {bad[:3]}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for u in urls[:8]:
        with opener.open(u, timeout=10) as resp:
            resp.read()


def parse_overrides(items: list[str]) -> dict:
    import dataclasses

    import yaml

    from align_ray.data.config import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in names or not _:
            raise SystemExit(f"--ours-set {item!r}: expected KEY=VALUE with KEY in {sorted(names)}")
        out[key] = yaml.safe_load(value)
    return out


def fmt_failures(failures: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(failures.items(), key=lambda kv: -kv[1])) or "-"


class Cluster:
    """The local Ray cluster ours-stage runs on, started in this process (not timed)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.temp, self.starts = args, None, 0

    def is_up(self) -> bool:
        import ray

        return ray.is_initialized()

    def up(self) -> None:
        import ray
        import ray.data

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
        t = time.time()
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, self.args.processes),
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _temp_dir=self.temp)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        self.starts += 1
        print(f"  (ray {ray.__version__} local cluster up in {time.time() - t:.1f}s)", flush=True)

    def down(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self.temp:
                shutil.rmtree(self.temp, ignore_errors=True)
                self.temp = None


def settle(limit: float = 15.0, quiet: float = 0.15) -> None:
    """Wait (up to ``limit`` s) until the machine is nearly idle between two runs."""
    deadline = time.time() + limit
    cores = os.cpu_count() or 1
    while time.time() < deadline:
        b0, t0 = machine_busy_seconds(), time.time()
        time.sleep(0.5)
        if (machine_busy_seconds() - b0) / (time.time() - t0) < quiet * cores:
            return


# --------------------------------------------------------------------------- main
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
    p.add_argument("--server-backlog", type=int, default=1024,
                   help="listen backlog of the web server (0 = library default, 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed 200-URL run of each tool before the first round")
    p.add_argument("--img2dataset", default=str(REPO / ".venv-img2dataset" / "bin" / "img2dataset"))
    p.add_argument("--run-timeout", type=float, default=600, help="seconds per command run")
    p.add_argument("--workdir", help="where URL list, outputs and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (outputs, logs)")
    p.add_argument("--json", help="write all results here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(tools) - set(TOOLS):
        raise SystemExit(f"--tools: unknown {sorted(unknown)}")
    if "img2dataset" in tools and not Path(args.img2dataset).exists():
        raise SystemExit(f"{args.img2dataset} not found: run benchmarks/setup_img2dataset.sh")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-download-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    env = prepare_env(workdir)  # before anything imports Ray
    args.ours_overrides = parse_overrides(args.ours_set)

    web = WebServer(workdir / "urls.parquet", args.rows, args.pool_size,
                    tuple(args.image_size_range), args.server_backlog, args.seed)
    cluster = Cluster(args)
    results: list[dict] = []
    try:
        t = time.time()
        web.start()
        check_server(web.url_list, web.base_url)
        print(f"web server {web.base_url} (pid {web.proc.pid}) up in {time.time() - t:.1f}s, "
              f"{args.rows} URLs in {web.url_list}", flush=True)
        small = write_subset(web.url_list, workdir / "warmup.parquet", min(200, args.rows))

        def once(tool: str, url_list: Path, out: Path) -> dict:
            if tool == "ours-stage":
                if not cluster.is_up():
                    cluster.up()
                    if not args.no_warmup:  # a running cluster has run a Ray Data job before
                        res = run_ours_stage(args, small, workdir / f"warmup-{cluster.starts}")
                        print(f"  (ray cluster started, warm-up job {res['ok']} images "
                              f"{res['wall_s']:.1f}s)", flush=True)
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
                if tool == "ours-stage" and not cluster.is_up():
                    once(tool, small, workdir / f"warmup-r{rnd}")  # brings the cluster up
                settle()
                busy0, srv0 = machine_busy_seconds(), web.cpu_seconds()
                with CpuSampler(web.proc.pid) as cpu:
                    res = once(tool, web.url_list, out)
                res["busy_core_s"] = round(machine_busy_seconds() - busy0, 2)
                res["server_cpu_s"] = round(web.cpu_seconds() - srv0, 2)
                res["cpu_s_by_group"] = cpu.by_group()
                res["cpu_s_other_top"] = cpu.top_other()
                res.update(round=rnd, tool=tool, rows=args.rows, wall_s=round(res["wall_s"], 3),
                           images_per_s=round(res["ok"] / res["wall_s"], 1))
                results.append(res)
                print(f"round {rnd} {tool:<12} {res['ok']:>6}/{args.rows} ok  "
                      f"{res['wall_s']:7.2f}s  {res['images_per_s']:7.1f} images/s  "
                      f"busy {res['busy_core_s']:.1f} core-s (server {res['server_cpu_s']:.1f})"
                      + ("" if res["ok"] == args.rows else
                         f"  FAILURES: {fmt_failures(res['failures'])}")
                      + ("" if res["sha256_column"] else "  NO sha256 COLUMN"), flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        cluster.down()
        web.stop()

    report = summarize(args, argv, tools, results, workdir)
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"\nresults written to {args.json}")
    if args.keep:
        print(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r["ok"] >= 0.99 * r["rows"] for r in results) else 1


def summarize(args, argv, tools, results, workdir) -> dict:
    medians = {}
    for tool in tools:
        runs = [r for r in results if r["tool"] == tool]
        if runs:
            medians[tool] = {
                "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
                "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
                "ok_fraction": round(min(r["ok"] for r in runs) / args.rows, 4),
                "busy_core_s_per_1k": round(statistics.median(
                    1000 * r["busy_core_s"] / max(r["ok"], 1) for r in runs), 2),
                "cpu_s_per_1k_by_group": {
                    g: round(statistics.median(1000 * r["cpu_s_by_group"].get(g, 0.0)
                                               / max(r["ok"], 1) for r in runs), 2)
                    for g in sorted({g for r in runs for g in r["cpu_s_by_group"]})}}
    ratios = {}
    if "img2dataset" in medians:
        base = medians["img2dataset"]["images_per_s"]
        for tool in ("ours-stage", "ours-cli"):
            if tool in medians and base:
                ratios[f"{tool}/img2dataset"] = round(medians[tool]["images_per_s"] / base, 2)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_download.py", *argv]),
        "machine": machine(),
        "versions": versions(args),
        "settings": {
            "rows": args.rows, "repeats": args.repeats, "processes": args.processes,
            "img2dataset_threads": args.i2d_threads, "shard_size": args.shard_size,
            "ours_overrides": args.ours_overrides,
            "ours_config": {k: v for k, v in vars(ours_config(args, Path("-"), Path("-"))).items()
                            if k not in ("input", "output")},
            "img2dataset_command": img2dataset_cmd(args, Path("URLS"), Path("OUT")),
            "web": {"photo_like": True, "image_size_range": list(args.image_size_range),
                    "pool_size": args.pool_size, "noise": False, "faults": False,
                    "server_backlog": args.server_backlog or 5, "seed": args.seed},
            "tools": tools},
        "runs": results,
        "medians": medians,
        "ratios": ratios,
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
              f"{1000 * r['busy_core_s'] / max(r['ok'], 1):>14.2f} {par:>4} {first:>5.1f}")
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
        print(f"  ratio {name}: {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
