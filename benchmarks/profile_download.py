#!/usr/bin/env python
"""Where the CPU of one download actor goes: our ``ShardDownloader`` run in-process (no Ray)
against the built-in web (same setup as bench_download.py), with each step timed by thread CPU.

    timeout 600 .venv/bin/python benchmarks/profile_download.py [--rows 4000] [--py-spy]

Prints, per image: CPU of the fetch loop thread (aiohttp, asyncio, building result rows), of
the decode threads (split into JPEG decode, pHash, crop/resize, header parse + JPEG encode,
sha256), of the main thread (reading the shard, writing parquet + tar + marker), and the web
server's CPU.  ``--py-spy`` also samples the process with py-spy (``pip install py-spy``) and
prints the hottest leaf frames.

The actor code itself is not modified: the profiler wraps module-level functions of
``align_ray.data`` (``downloader._decode``, ``resizer._decode_jpeg``/``phash``/``_scale``/
``_frame``, ``downloader.write_part``) with timers that call the originals.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import WebServer, prepare_env  # noqa: E402


class Timers:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.lock = threading.Lock()

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                with self.lock:
                    self.cpu[name] += time.thread_time() - t
                    self.calls[name] += 1
        return timed


def plan_without_ray(cfg) -> dict:
    """What pipeline.ensure_plan does, with the manifest built in this process."""
    from align_ray.data import reader
    from align_ray.data.writer import Layout

    layout = Layout(cfg.output)
    files = reader.list_inputs(cfg.input)
    entries = [reader.build_manifest(cfg.input, f, i, cfg, reader.manifest_path(layout, i))
               for i, f in enumerate(files)]
    plan = {**reader.plan_key(cfg, files), "files": entries,
            "input_rows": sum(e["rows"] for e in entries)}
    reader.save_plan(layout, plan)
    return plan


def summarize_pyspy(raw: Path, top: int = 20) -> list[tuple[int, str]]:
    """Leaf frames of py-spy's collapsed stacks, by samples."""
    leaf: collections.Counter = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaf[frames[-1]] += int(count)
    total = sum(leaf.values()) or 1
    print(f"\npy-spy: {total} samples (active threads only); hottest leaf frames:")
    for frame, n in leaf.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame[:150]}")
    return leaf.most_common(top)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=64)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=128)
    p.add_argument("--image-size-range", type=int, nargs=2, default=(640, 1024))
    p.add_argument("--py-spy", action="store_true", help="also sample with py-spy")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="profile-download-"))
    prepare_env(workdir)
    web = WebServer(workdir / "urls.parquet", args.rows, args.pool_size,
                    tuple(args.image_size_range))
    spy = None
    try:
        web.start()
        from align_ray.data import downloader, resizer
        from align_ray.data.config import DataConfig
        from align_ray.data.hashing import sha256_hex

        cfg = DataConfig(input=str(web.url_list), output=str(workdir / "out"), image_size=256,
                         resize_mode="center_crop", allow_cidr=["127.0.0.0/8"],
                         threads=args.threads, decode_threads=args.decode_threads,
                         shard_size=args.shard_size)
        plan = plan_without_ray(cfg)
        timers = Timers()
        resizer._decode_jpeg = timers.wrap("jpeg_decode (cv2.imdecode, DCT-scaled)",
                                           resizer._decode_jpeg)
        resizer.phash = timers.wrap("phash (on the scaled picture)", resizer.phash)
        resizer._scale = timers.wrap("resize", resizer._scale)
        resizer._frame = timers.wrap("crop", resizer._frame)
        process_image = timers.wrap("process_image (total)", resizer.process_image)
        sha = timers.wrap("sha256", sha256_hex)
        downloader._decode = lambda body, c: (process_image(body, c), sha(body))
        downloader.write_part = timers.wrap("write parquet + tar", downloader.write_part)
        downloader.write_marker = timers.wrap("write marker", downloader.write_marker)
        downloader.reader.read_shard_rows = timers.wrap("read shard rows",
                                                        downloader.reader.read_shard_rows)

        actor = downloader.ShardDownloader(cfg)

        async def loop_cpu() -> float:
            return time.thread_time()

        # one untimed shard-sized warm-up (connections, imports, caches) like a running actor
        warm = workdir / "warm"
        shutil.copytree(workdir / "out", warm)
        actor.layout = downloader.Layout(str(warm))
        actor.process("00000_00000", 0, 0, False)
        actor.layout = downloader.Layout(cfg.output)
        timers.cpu.clear()
        timers.calls.clear()

        if args.py_spy:
            exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
            raw = workdir / "py-spy.txt"
            spy = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", "250",
                                    "--format", "raw", "--output", str(raw), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)

        n_shards = sum(f["shards"] for f in plan["files"])
        loop0, proc0, srv0, wall0 = (actor._run(loop_cpu()), time.process_time(),
                                     web.cpu_seconds(), time.time())
        main0 = time.thread_time()
        rows = 0
        for g in range(n_shards):
            info = actor.process(f"00000_{g:05d}", 0, g, False)
            rows += info["output_rows"]
            if info["dropped"]:
                print("dropped:", info["dropped"])
        wall = time.time() - wall0
        loop_cpu_s = actor._run(loop_cpu()) - loop0
        proc_cpu = time.process_time() - proc0
        main_cpu = time.thread_time() - main0
        srv_cpu = web.cpu_seconds() - srv0
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
    finally:
        web.stop()

    per = 1000.0 / max(rows, 1)
    decode_cpu = timers.cpu["process_image (total)"] + timers.cpu["sha256"]
    print(f"\n{rows} images in {wall:.2f}s = {rows / wall:.0f} images/s on ONE actor "
          f"(threads={args.threads}, decode_threads={args.decode_threads}, "
          f"shard_size={args.shard_size}); process CPU {proc_cpu:.2f}s = "
          f"{proc_cpu / wall:.2f} cores")
    print("\nCPU ms per image:")
    print(f"  {'decode threads (process_image + sha256)':<46} {decode_cpu * per:6.2f}")
    ms = {"decode threads (process_image + sha256)": decode_cpu * per}
    known = 0.0
    for name in ("jpeg_decode (cv2.imdecode, DCT-scaled)", "phash (on the scaled picture)",
                 "resize", "crop"):
        known += timers.cpu[name]
        print(f"    {name:<44} {timers.cpu[name] * per:6.2f}")
        ms[name] = timers.cpu[name] * per
    rest = timers.cpu["process_image (total)"] - known
    ms.update({"sniff + PIL header/EXIF + JPEG encode": rest * per,
               "sha256": timers.cpu["sha256"] * per,
               "fetch loop thread (aiohttp + asyncio + rows)": loop_cpu_s * per,
               "main thread (read rows, write parquet+tar+marker)": main_cpu * per})
    print(f"    {'sniff + PIL header/EXIF + JPEG encode':<44} {rest * per:6.2f}")
    print(f"    {'sha256':<44} {timers.cpu['sha256'] * per:6.2f}")
    print(f"  {'fetch loop thread (aiohttp + asyncio + rows)':<46} {loop_cpu_s * per:6.2f}")
    print(f"  {'main thread (read rows, write parquet+tar+marker)':<46} {main_cpu * per:6.2f}")
    for name in ("read shard rows", "write parquet + tar", "write marker"):
        print(f"    {name:<44} {timers.cpu[name] * per:6.2f}")
    other = proc_cpu - decode_cpu - loop_cpu_s - main_cpu
    print(f"  {'other threads of the process':<46} {other * per:6.2f}")
    print(f"  {'= actor process total':<46} {proc_cpu * per:6.2f}")
    print(f"  {'web server process (separate)':<46} {srv_cpu * per:6.2f}")
    ms.update({"other threads of the process": other * per,
               "actor process total": proc_cpu * per, "web server process (separate)": srv_cpu * per})
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "load_avg_end": os.getloadavg(), "images": rows, "wall_s": round(wall, 2),
            "images_per_s": round(rows / wall, 1), "process_cores": round(proc_cpu / wall, 2),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "cpu_ms_per_image": {k: round(v, 3) for k, v in ms.items()}}, indent=1))
        print(f"results written to {args.json}")
    if args.py_spy and (workdir / "py-spy.txt").exists():
        summarize_pyspy(workdir / "py-spy.txt")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
