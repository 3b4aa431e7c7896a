"""The README's newcomer sequence, timed as a user runs it: each command a fresh process that
starts its own local Ray (the machine's real CPU count), default flags.

    train 20 steps -> index (dev set, 1,540 rows) -> serve -> one request to every endpoint

    .venv/bin/python benchmarks/bench_newcomer.py --repeats 3 --out benchmarks/results/newcomer-DATE.json

Reports every command's whole-process wall time (Ray start and shutdown included), the median
over the repeats, and the load average around each run, since this box is shared.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
from _bench_common import DEV_SET as DEV  # noqa: E402


def _cli(*args: str, cwd: Path, timeout: float) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "align_ray.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_query(model: Path, index: Path, cwd: Path) -> dict:
    """Seconds until the URL line, the requests, and until exit after SIGINT."""
    import pyarrow.parquet as pq

    port = _free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "align_ray.cli", "serve", "--model", str(model),
                             "--index", str(index), "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = None
    try:
        for line in proc.stdout:
            if line.startswith("align-ray serve: http"):
                base = line.split()[2].rstrip("/")
                break
        if base is None:
            raise SystemExit("serve exited before it answered")
        up = time.monotonic() - t0
        image = base64.b64encode(pq.read_table(DEV, columns=["image"]).column(0)[0].as_py()).decode()
        t1 = time.monotonic()
        for path, body in [("/v1/embed/text", {"texts": ["red apple"]}),
                           ("/v1/embed/image", {"images": [image]}),
                           ("/v1/search", {"text": "red apple", "k": 5}),
                           ("/v1/classify", {"image": image, "labels": ["apple", "car"]})]:
            r = requests.post(base + path, json=body, timeout=60)
            r.raise_for_status()
        for path in ("/healthz", "/v1/image/0", "/"):
            requests.get(base + path, timeout=60).raise_for_status()
        queries = time.monotonic() - t1
    finally:
        t2 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    return {"serve_until_answering_s": round(up, 1), "queries_s": round(queries, 2),
            "serve_shutdown_s": round(time.monotonic() - t2, 1)}


def one_run() -> dict:
    with tempfile.TemporaryDirectory(prefix="newcomer-") as d:
        cwd = Path(d)
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        train = _cli("train", "--data", str(DEV), "--image-col", "image", "--text-col", "alt_text",
                     "--output", "run", "--batch-size", "16", "--steps", "20",
                     cwd=cwd, timeout=900)
        index = _cli("index", "--model", "run/model", "--data", str(DEV), "--image-col", "image",
                     "--text-col", "text", "--output", "index", cwd=cwd, timeout=900)
        serve = _serve_and_query(cwd / "run" / "model", cwd / "index", cwd)
        total = time.monotonic() - t0
        return {"train_s": round(train, 1), "index_s": round(index, 1), **serve,
                "total_s": round(total, 1), "load_before": round(load0, 2),
                "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        runs.append(one_run())
        print(json.dumps(runs[-1]), flush=True)
    keys = [k for k in runs[0] if k.endswith("_s")]
    result = {"machine": f"{os.cpu_count()} CPUs, no GPU", "runs": runs,
              "median": {k: statistics.median(r[k] for r in runs) for k in keys},
              "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["median"]))


if __name__ == "__main__":
    main()
