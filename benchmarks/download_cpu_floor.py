#!/usr/bin/env python
"""How fast can a whole ``align-ray data`` process be on this machine?  A CPU floor for issue
12's goal (the whole process at >= 1.5x img2dataset's images/s, 4,000 URLs).

Both tools are CPU-bound on a 2-core box (bench_download.py: about 1.7-1.9 busy cores each for
the whole run), so a whole process can take no less wall time than the CPU it needs divided by
the cores.  This script measures the parts of our process that no scheduling, overlap or
executor choice removes, and from them the fastest possible run:

1. ``per_image``: the download actors' own work per URL (``ShardDownloader._download_all``:
   HTTP fetch, DCT-scaled JPEG decode, resize, pHash, sha256, re-encode), in one process
   without Ray, over the benchmark's URL list from the same web server in its own process
   (its CPU not counted); median over ``--repeats`` passes after a 100-URL warm-up.  Also the
   JPEG decode alone (``cv2.imdecode`` at the reduction the stage picks), the part of it that
   no Python change reaches.
2. ``ray_start_stop``: the machine's busy core-seconds for a process that does only the CLI's
   own Ray start and stop (``ray_env.init_for_command("local")``, exit): GCS, raylet, agents,
   monitors, prestarted workers, shutdown.
3. ``actor_import``: the CPU of a fresh interpreter importing the download actor's module
   (``align_ray.data.downloader``: pyarrow, OpenCV, Pillow, aiohttp); the stage starts one
   actor per CPU.

Then it runs ``bench_download.py`` (``ours-cli`` and ``img2dataset``, equal concurrency, the
same web server settings) in the same invocation and reports, with its medians:

    floor_core_s = rows x per_image + ray_start_stop + actors x actor_import + web server CPU
    fastest whole process = floor_core_s / cores (every core busy from launch to exit)
    best possible ratio   = img2dataset's whole-process wall / that

The floor leaves out what the real process adds (Ray Data's helper actors, the driver's Python,
the plan task, writing the shards, idle gaps while processes start), so the real process is
slower than it, never faster.

    .venv/bin/python benchmarks/download_cpu_floor.py --json benchmarks/results/download-cpu-floor-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, WebServer, machine, machine_busy_seconds, prepare_env  # noqa: E402


def per_image_cpu(url_list: Path, rows: int, repeats: int) -> dict:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from align_ray.data import resizer
    from align_ray.data.config import DataConfig
    from align_ray.data.downloader import ShardDownloader

    urls = pq.read_table(url_list, columns=["url"]).column("url").to_pylist()[:rows]
    table = pa.table({"key": [f"{i:09d}" for i in range(len(urls))], "url": urls,
                      "text": ["x"] * len(urls)})
    cfg = DataConfig(output=tempfile.mkdtemp(prefix="floor-"), allow_cidr=["127.0.0.0/8"],
                     threads=32, image_size=256, resize_mode="center_crop", max_per_host=256)
    dl = ShardDownloader(cfg)
    dl._run(dl._download_all(table.slice(0, 100), None))          # imports, connections
    passes = []
    for _ in range(repeats):
        c0 = time.process_time()
        result, _ = dl._run(dl._download_all(table, None))
        passes.append(1000 * (time.process_time() - c0) / max(len(result.samples["key"]), 1))
    # the decode alone, on the bodies of the first 400 URLs, at the stage's own reduction
    bodies = [dl._run(dl.fetcher.fetch(u, None)).body for u in urls[:400]]
    sizes = [Image.open(io.BytesIO(b)).size for b in bodies]
    decode = []
    for _ in range(repeats):
        c0 = time.process_time()
        for b, (width, height) in zip(bodies, sizes):
            resizer._decode_jpeg(b, width, height, cfg)
        decode.append(1000 * (time.process_time() - c0) / len(bodies))
    return {"per_image_ms": round(statistics.median(passes), 3), "passes_ms": [round(x, 3) for x in passes],
            "decode_ms": round(statistics.median(decode), 3), "decode_passes_ms": [round(x, 3) for x in decode],
            "mean_body_kb": round(sum(map(len, bodies)) / len(bodies) / 1024, 1)}


def busy_of(code: str) -> tuple[float, float]:
    """(machine busy core-seconds, wall seconds) of ``python -c code``, stragglers included."""
    time.sleep(2)
    b0, t0 = machine_busy_seconds(), time.time()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    wall = time.time() - t0
    time.sleep(1.0)   # processes the command left to exit on their own
    return machine_busy_seconds() - b0, wall


def child_cpu(code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="download-floor-"))
    prepare_env(work)
    cores = os.cpu_count() or 1

    web = WebServer(work / "urls.parquet", args.rows, 128, (640, 1024)).start()
    try:
        image = per_image_cpu(web.url_list, args.rows, args.repeats)
    finally:
        web.stop()
    print("per image:", json.dumps(image), flush=True)

    starts = [busy_of("from align_ray import ray_env; ray_env.init_for_command('local')")
              for _ in range(args.repeats)]
    imports = [child_cpu("import align_ray.data.downloader") for _ in range(args.repeats)]
    ray_core_s = statistics.median(b for b, _ in starts)
    import_s = statistics.median(imports)
    print(f"Ray start+stop {[round(b, 2) for b, _ in starts]} core-s; "
          f"actor import {[round(x, 2) for x in imports]} core-s", flush=True)

    dl_json = work / "download.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_download.py"),
                    "--tools", "ours-cli,img2dataset", "--rows", str(args.rows),
                    "--repeats", str(args.repeats), "--wait-for", "", "--ours-set", "threads=32",
                    "--json", str(dl_json)], check=True, cwd=REPO)
    dl = json.loads(dl_json.read_text())
    ours = [r for r in dl["runs"] if r["tool"] == "ours-cli"]
    i2d_wall = statistics.median(r["wall_s"] for r in dl["runs"] if r["tool"] == "img2dataset")
    server = statistics.median(r["server_cpu_s"] for r in ours)
    actors = dl["settings"]["processes"]   # the download actors bench_download started
    floor = args.rows * image["per_image_ms"] / 1000 + ray_core_s + actors * import_s + server
    fastest = floor / cores
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "command": sys.argv, "rows": args.rows, "cores": cores,
        "per_image": image, "ray_start_stop_core_s": [round(b, 3) for b, _ in starts],
        "ray_start_stop_wall_s": [round(w, 3) for _, w in starts],
        "actor_import_core_s": [round(x, 3) for x in imports],
        "web_server_core_s_median": server,
        "floor_core_s": round(floor, 2), "fastest_whole_process_s": round(fastest, 2),
        "img2dataset_wall_s_median": i2d_wall,
        "best_possible_ratio": round(i2d_wall / fastest, 3),
        "wall_for_goal_1_5x_s": round(i2d_wall / 1.5, 2),
        "utilisation_needed_for_goal": round(floor / (cores * i2d_wall / 1.5), 3),
        "ours_cli_measured": {
            "wall_s_median": statistics.median(r["wall_s"] for r in ours),
            "busy_core_s_median": statistics.median(r["busy_core_s"] for r in ours),
            "cpu_s_by_group_median": {g: statistics.median(r["cpu_s_by_group"].get(g, 0) for r in ours)
                                      for g in ours[0]["cpu_s_by_group"]}},
        "download_benchmark": dl,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("download_benchmark", "machine")},
                     indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
