"""Ray Data's V1 and V2 Parquet datasources, as align-ray reads (``ray_env.read_parquet``).

Two rows per datasource, alternating within each round:

* ``read``: ``read_parquet(...).materialize()`` of a file in a running local Ray (2 CPUs),
  wall seconds, plus the ListFiles operator's wall and CPU time from Ray Data's own stats
  (V2 only: V1 has no such operator);
* ``index``: ``align-ray index`` on the shared dev set as a whole process (starts and stops
  its own Ray), with RAY_DATA_USE_DATASOURCE_V2=0 or 1 (``ray_env.read_parquet`` honours a
  user's explicit setting).

    .venv/bin/python benchmarks/bench_parquet_read.py --rounds 5 \\
        --json benchmarks/results/parquet-read-DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from _bench_common import DEV_SET as DEV  # noqa: E402


def read_rounds(rounds: int, path: str) -> list[dict]:
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ray.data.range(10).materialize()          # workers started before the first timed read
    out = []
    for r in range(rounds):
        for v2 in (False, True) if r % 2 == 0 else (True, False):
            ctx.use_datasource_v2 = v2
            t = time.perf_counter()
            ds = ray.data.read_parquet(path).materialize()
            row = {"round": r, "datasource": "v2" if v2 else "v1",
                   "wall_s": round(time.perf_counter() - t, 3), "rows": ds.count()}
            m = re.search(r"ListFiles: .*?Remote wall time: [\d.]+\w* min, [\d.]+\w* max, "
                          r"([\d.]+)(\w*) mean.*?Remote cpu time: [\d.]+\w* min, [\d.]+\w* max, "
                          r"([\d.]+)(\w*) mean", ds.stats(), re.S)
            if m:
                unit = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
                row["listfiles_wall_s"] = float(m[1]) * unit[m[2]]
                row["listfiles_cpu_s"] = float(m[3]) * unit[m[4]]
            out.append(row)
            print(json.dumps(row), flush=True)
    ray.shutdown()
    return out


def index_rounds(rounds: int) -> list[dict]:
    out = []
    for r in range(rounds):
        for v2 in ("0", "1") if r % 2 == 0 else ("1", "0"):
            with tempfile.TemporaryDirectory() as d:
                model = Path(d, "run")
                if not Path("/tmp/bench-parquet-model/model").exists():
                    subprocess.run([sys.executable, "-m", "align_ray.cli", "train", "--data",
                                    str(DEV), "--image-col", "image", "--text-col", "alt_text",
                                    "--output", "/tmp/bench-parquet-model", "--steps", "2",
                                    "--batch-size", "16"], check=True, cwd=REPO,
                                   capture_output=True)
                env = {**os.environ, "RAY_DATA_USE_DATASOURCE_V2": v2}
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "align_ray.cli", "index", "--model",
                                "/tmp/bench-parquet-model/model", "--data", str(DEV),
                                "--image-col", "image", "--text-col", "text",
                                "--output", str(model)], check=True, cwd=REPO, env=env,
                               capture_output=True)
                row = {"round": r, "datasource": "v2" if v2 == "1" else "v1",
                       "index_wall_s": round(time.perf_counter() - t, 2)}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--index-rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    reads = {name: read_rounds(a.rounds, path) for name, path in
             (("tiny", _tiny()), ("dev_set", str(DEV)))}
    index = index_rounds(a.index_rounds)
    summary = {}
    for name, rows in [*reads.items(), ("index", index)]:
        key = "index_wall_s" if name == "index" else "wall_s"
        for ds in ("v1", "v2"):
            vals = [x[key] for x in rows if x["datasource"] == ds]
            summary[f"{name}/{ds}/median_s"] = round(statistics.median(vals), 3)
    lf = [x for x in reads["tiny"] + reads["dev_set"] if "listfiles_wall_s" in x]
    summary["v2_listfiles_wall_median_s"] = statistics.median(x["listfiles_wall_s"] for x in lf)
    summary["v2_listfiles_cpu_median_s"] = statistics.median(x["listfiles_cpu_s"] for x in lf)
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "reads": reads, "index": index,
                                            "machine": f"{os.cpu_count()} CPUs"}, indent=1))


def _tiny() -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(tempfile.mkdtemp(), "tiny.parquet")
    pq.write_table(pa.table({"a": list(range(100))}), path)
    return path


if __name__ == "__main__":
    main()
