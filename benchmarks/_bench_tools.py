"""The three tools ``bench_download.py`` times, each into a fresh output folder:

* ``run_ours_stage``: ``align_ray.data.pipeline.run`` on the Ray cluster of this process
  (:class:`Cluster`, started untimed, as a job on a running cluster finds it);
* ``run_ours_cli``: ``align-ray data --ray-address local`` as a command (pays for its own Ray);
  ``phases_s`` splits its wall time into ``start`` (interpreter, imports, ``ray.init``),
  ``stage`` (``pipeline.run``: plan, actors, downloads) and ``exit`` (Ray shutdown, exit);
* ``run_img2dataset``: the ``img2dataset`` command (webdataset, sha256, center crop 256).

Each returns ``{"wall_s", "ok", "failures", "shards": [{shard, start_s, end_s, rows}],
"sha256_column", ...}``; ``args`` is bench_download's parsed command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _bench_common import REPO


# --------------------------------------------------------------------------- ours
def parse_overrides(items: list[str]) -> dict:
    """``--ours-set KEY=VALUE`` items -> DataConfig fields (values parsed as YAML)."""
    import yaml

    from align_ray.data.config import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key not in names or not sep:
            raise SystemExit(f"--ours-set {item!r}: expected KEY=VALUE with KEY in {sorted(names)}")
        out[key] = yaml.safe_load(value)
    return out


def ours_config(args, url_list: Path, out: Path):
    from align_ray.data.config import DataConfig

    fields = dict(input=str(url_list), output=str(out), image_size=256,
                  resize_mode="center_crop", allow_cidr=["127.0.0.0/8"],
                  processes=args.processes, shard_size=args.shard_size,
                  # the noisy web is one host standing in for many: a per-host cap above the
                  # actor's downloads in flight (threads), so the gate runs but never waits
                  max_per_host=256)
    fields.update(args.ours_overrides)
    return DataConfig(**fields)


def _has_sha256(parquet: Path | None) -> bool:
    if parquet is None:
        return False
    import pyarrow.parquet as pq

    col = pq.read_table(parquet, columns=["sha256"]).column("sha256")
    return col.null_count == 0 and len(col) > 0 and len(col[0].as_py()) == 64


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
    t0 = time.time()
    _call(cmd, logs / f"{out.name}.log", env, REPO, args.run_timeout)
    t1 = time.time()
    res = {"wall_s": t1 - t0, "command": cmd, **ours_summary(out, t0)}
    # where the whole process's time went: stats.json is written as pipeline.run returns
    stage_end = (out / "stats.json").stat().st_mtime
    res["phases_s"] = {"start": round(stage_end - res["stage_seconds"] - t0, 2),
                       "stage": round(res["stage_seconds"], 2),
                       "exit": round(t1 - stage_end, 2)}
    return res


class Cluster:
    """The local Ray cluster ours-stage runs on, started in this process (not timed)."""

    def __init__(self, processes: int):
        self.processes, self.temp, self.starts = processes, None, 0

    @staticmethod
    def is_up() -> bool:
        import ray

        return ray.is_initialized()

    def up(self) -> None:
        import ray
        import ray.data

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
        t = time.time()
        for attempt in (1, 2):  # a loaded box can time out a node's start once
            try:
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, self.processes),
                         include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                         _temp_dir=self.temp)
                break
            except Exception as e:  # noqa: BLE001 - retried once, then raised
                ray.shutdown()
                if attempt == 2:
                    raise
                print(f"  (ray.init failed, retrying: {e})", flush=True)
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


# --------------------------------------------------------------------------- img2dataset
def img2dataset_cmd(args, url_list: Path, out: Path) -> list[str]:
    return [args.img2dataset, "--url_list", str(url_list), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
            "--output_folder", str(out), "--image_size", "256", "--resize_mode", "center_crop",
            "--processes_count", str(args.processes), "--thread_count", str(args.i2d_threads),
            "--compute_hash", "sha256", "--number_sample_per_shard", str(args.shard_size),
            "--distributor", "multiprocessing", "--enable_wandb", "False", "--retries", "0"]


def run_img2dataset(args, url_list: Path, out: Path, env: dict, logs: Path) -> dict:
    cmd = img2dataset_cmd(args, url_list, out)
    t0 = time.time()
    _call(cmd, logs / f"{out.name}.log", env, out.parent, args.run_timeout)
    wall = time.time() - t0
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


def _call(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float) -> None:
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             timeout=timeout)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{Path(cmd[0]).name} exited {rc}; see {log}:\n{tail}")
