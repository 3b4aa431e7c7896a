"""Shared plumbing of the download benchmarks: the environment every run gets, the built-in web
server in a child process, and CPU accounting per process group (from /proc).

Used by ``bench_download.py`` (ours vs img2dataset) and ``profile_download.py`` (one actor).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")


def shared_dir() -> Path:
    """The read-only shared folder, found as the tests find it (tests/conftest.py):
    $ALIGN_RAY_SHARED, or a ``shared/`` inside or next to the checkout, or /work/shared."""
    env = os.environ.get("ALIGN_RAY_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO / "shared", REPO.parent / "shared",
                                                Path("/work/shared")]:
        if (cand / "data").is_dir():
            return cand
    return REPO.parent / "shared"


DEV_SET = shared_dir() / "data" / "emoji_noto_dev.parquet"   # the shared image-text dev set


# --------------------------------------------------------------------------- environment
def prepare_env(workdir: Path) -> dict[str, str]:
    """Set (in os.environ, before Ray is imported) and return the environment for all runs.

    ``HOME`` holds a ``ray_bootstrap_config.yaml`` with a local provider (otherwise Ray probes
    cloud metadata addresses); wandb and the albumentations update check are off; proxies are
    cleared so all traffic stays on 127.0.0.1."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    os.environ.update(HOME=str(home), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                      WANDB_MODE="disabled", WANDB_DISABLED="true", WANDB_SILENT="true",
                      NO_ALBUMENTATIONS_UPDATE="1", TQDM_DISABLE="1")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    return dict(os.environ)


def machine() -> dict:
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpus": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "cpu_model": model,
            "kernel": platform.release()}


def versions(img2dataset_exe: str | None = None) -> dict:
    from importlib.metadata import version

    import ray

    out = {"python": platform.python_version(), "ray": ray.__version__}
    for mod in ("aiohttp", "opencv-python-headless", "pillow", "pyarrow"):
        try:
            out[mod] = version(mod)
        except Exception:  # noqa: BLE001 - informational only
            pass
    if img2dataset_exe:
        py = Path(img2dataset_exe).with_name("python")
        try:
            out["img2dataset"] = subprocess.run(
                [str(py), "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
                capture_output=True, text=True, timeout=60).stdout.split()[0]
        except Exception:  # noqa: BLE001
            out["img2dataset"] = "unknown"
    return out


# --------------------------------------------------------------------------- web server
class WebServer:
    """``python -m align_ray.web`` in a child process (its own GIL and core time): writes the
    URL list (photo-like JPEGs from a pre-rendered pool, noise and faults off), then serves
    until :meth:`stop`."""

    def __init__(self, url_list: Path, rows: int, pool_size: int, size_range: tuple[int, int],
                 seed: int = 0):
        self.url_list = url_list
        self.cmd = [sys.executable, "-m", "align_ray.web", "--host", "127.0.0.1", "--port", "0",
                    "--rows", str(rows), "--output", str(url_list), "--no-noise", "--photo-like",
                    "--pool-size", str(pool_size), "--image-size-range", *map(str, size_range),
                    "--seed", str(seed)]
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self, timeout: float = 900.0) -> "WebServer":
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

    def check(self) -> None:
        """Every URL is on this server, and the first few answer."""
        import urllib.request

        import pyarrow.parquet as pq

        urls = pq.read_table(self.url_list, columns=["url"]).column("url").to_pylist()
        bad = [u for u in urls if not u.startswith(self.base_url + "/")]
        if bad:
            raise RuntimeError(f"{len(bad)} URLs are not on {self.base_url}: {bad[:3]}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for u in urls[:8]:
            with opener.open(u, timeout=10) as resp:
                resp.read()

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


def _cmdlines() -> dict[int, str]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
    return out


def wait_while_running(pattern: str, poll: float = 10.0) -> None:
    """Block while a process whose command line holds ``pattern`` (e.g. a test run) exists."""
    said = False
    while pattern and any(pattern in cmd for pid, cmd in _cmdlines().items()
                          if pid != os.getpid()):
        if not said:
            print(f"  (waiting: a '{pattern}' process is running)", flush=True)
            said = True
        time.sleep(poll)


def settle(limit: float = 15.0, quiet: float = 0.15) -> None:
    """Wait (up to ``limit`` s) until the machine is nearly idle between two runs."""
    deadline = time.time() + limit
    cores = os.cpu_count() or 1
    while time.time() < deadline:
        b0, t0 = machine_busy_seconds(), time.time()
        time.sleep(0.5)
        if (machine_busy_seconds() - b0) / (time.time() - t0) < quiet * cores:
            return


class CpuSampler:
    """CPU seconds per process group during one run, polled from /proc.  Short-lived processes
    such as Ray actors are caught by polling every ``interval`` s; a process counts with the
    tool it descends from (e.g. img2dataset's spawned workers)."""

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
        # img2dataset and its (spawned) workers; stop at the driver, whose own command line
        # may name img2dataset (--tools, --img2dataset)
        while cur in self.info and cur not in seen and cur != self.me:
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

    def matching(self, pattern: str) -> list[str]:
        """Command lines seen during the run that hold ``pattern`` (a foreign load)."""
        return sorted({cmd[:100] for _, cmd in self.info.values() if pattern and pattern in cmd})

    def top_other(self, n: int = 5) -> list[tuple[float, str]]:
        rows = [(round(cpu - self.first.get(pid, 0.0), 2), self.info.get(pid, (0, ""))[1][:100])
                for pid, cpu in self.last.items() if self._group(pid) == "other"]
        return sorted((r for r in rows if r[0] > 0.05), reverse=True)[:n]


def write_json(path: str | Path, report: dict) -> None:
    """A benchmark's results file (folders made as needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"results written to {path}")
