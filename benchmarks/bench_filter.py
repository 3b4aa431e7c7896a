"""Benchmark of ALIGN's global frequency filter (Ray Data) against a pyarrow baseline.

    .venv/bin/python benchmarks/bench_filter.py [--rows 1000000 4000000] [--repeats 3]

For each size: a synthetic text-and-hash table (Zipf-distributed alt-texts and images, as on
the web; written to parquet by a child process, so the driver never holds it), then in one
driver process and one local Ray cluster:

* ``counts``: the two counting steps alone (distinct (image, text) pairs -> texts per image and
  images per text), materialised, from the (img_id, text_hash) columns already in the object
  store (the pyarrow baseline also starts from them in memory);
* ``full``: the whole global plan (per-pair rules, both counts, rare-token vocabulary, exact
  duplicates, eval-set distances, joins back to one verdict per row), materialised;
* ``pyarrow``: the same two counts single-process (``Table.group_by().aggregate``) on the same
  table, read into memory first (not timed).

Reports medians over ``--repeats``, rows/s, the ratios the issue sets goals for, and the
driver's RSS before and at its peak during the full plan (sampled every 50 ms; each full run is
a fresh driver process joined to the same cluster, so the baseline's pyarrow memory pool in
this process does not blur it).  Results go to ``benchmarks/results/filter-DATE.json``
(``--out`` to change).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._bench_common import machine, prepare_env  # noqa: E402


def make_table(rows: int, out: Path, files: int = 16, seed: int = 0) -> None:
    """Child-process body: write ``rows`` synthetic rows as ``files`` parquet files."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from align_ray.data.hashing import text_hash

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(50_000)])
    n_texts, n_images = max(1000, rows // 2), max(1000, rows)
    word_ids = np.minimum(rng.zipf(1.3, size=(n_texts, 12)) - 1, len(words) - 1)
    lengths = rng.integers(1, 13, n_texts)
    texts = [" ".join(words[word_ids[i, :lengths[i]]]) for i in range(n_texts)]
    thash = np.array([text_hash(t) for t in texts], np.uint64)
    shas = np.array([rng.bytes(32).hex() for _ in range(n_images)])
    phash = rng.integers(0, 2 ** 63, n_images, dtype=np.uint64)
    dims = rng.integers(100, 1200, size=(n_images, 2)).astype(np.int32)
    # web-like: a heavy head (boilerplate texts, logos shared by many pages) and a long tail
    # of ids seen once; (zipf - 1) mod n keeps the tail instead of piling it on the last id
    t_id = (rng.zipf(1.15, rows) - 1) % n_texts
    i_id = (rng.zipf(1.1, rows) - 1) % n_images
    out.mkdir(parents=True, exist_ok=True)
    text_arr = pa.array(texts)
    for f, idx in enumerate(np.array_split(np.arange(rows), files)):
        t = pa.table({
            "key": pa.array([f"{k:014d}" for k in idx]),
            "text": text_arr.take(pa.array(t_id[idx])),
            "sha256": pa.array(shas[i_id[idx]]), "phash": pa.array(phash[i_id[idx]]),
            "text_hash": pa.array(thash[t_id[idx]]),
            "original_width": pa.array(dims[i_id[idx], 0]),
            "original_height": pa.array(dims[i_id[idx], 1]),
            "shard": pa.array(np.full(len(idx), f, np.int32)),
        })
        pq.write_table(t, out / f"part-{f:03d}.parquet")


def _img_id_table(path: Path):
    """(img_id, text_hash): the columns the plan counts on (img_id = first 64 bits of sha256)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["sha256", "text_hash"])
    raw = bytes.fromhex("".join(s[:16] for s in t.column("sha256").to_pylist()))
    return pa.table({"img_id": np.frombuffer(raw, ">u8").astype(np.uint64),
                     "text_hash": t.column("text_hash")})


def pyarrow_counts(table) -> tuple[float, int, int]:
    """The same two counts, single process: distinct pairs, then per image and per text."""
    t0 = time.perf_counter()
    pairs = table.group_by(["img_id", "text_hash"]).aggregate([])
    per_image = pairs.group_by("img_id").aggregate([("text_hash", "count")])
    per_text = pairs.group_by("text_hash").aggregate([("img_id", "count")])
    return time.perf_counter() - t0, per_image.num_rows, per_text.num_rows


def ray_counts(ds, npart: int) -> tuple[float, int, int]:
    """Both counts on Ray Data from an already materialised (img_id, text_hash) dataset."""
    from align_ray.filter import counts

    t0 = time.perf_counter()
    pairs = counts.pair_table(ds, "img_id", "text_hash", npart).materialize()
    per_image = counts.per_key(pairs, "img_id", npart).materialize()
    per_text = counts.per_key(pairs, "text_hash", npart).materialize()
    n_i, n_t = per_image.count(), per_text.count()
    return time.perf_counter() - t0, n_i, n_t


def ray_full(path: Path, npart: int) -> tuple[float, dict]:
    import numpy as np
    import ray.data

    from align_ray.filter import plan
    from align_ray.filter.config import FilterConfig

    t0 = time.perf_counter()
    ds = ray.data.read_parquet(str(path))
    evals = np.random.default_rng(1).integers(0, 2 ** 63, 1000, dtype=np.uint64)
    p = plan.build(ds, FilterConfig(), evals, npart)
    v = p.verdicts.materialize()
    kept = v.filter(expr=ray.data.expressions.col("reason").is_null()).count()
    return time.perf_counter() - t0, {"kept": kept, "vocab": p.vocab}


def child_full(gcs: str, path: str, npart: str) -> int:
    """A fresh driver: the full plan once; prints time and RSS (before, peak) as JSON."""
    import ray
    import ray.data

    ray.init(address=gcs, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss = RssPeak()
    with rss:
        f_s, info = ray_full(Path(path), int(npart))
    print(json.dumps({"full_s": f_s, "rss": {"before": rss.before_mib, "peak": rss.peak_mib},
                      **info}))
    return 0


class RssPeak:
    """Samples this (driver) process's RSS every 50 ms while the block runs."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.before_mib = self.peak_mib = 0.0

    def __enter__(self):
        import threading

        self.before_mib = round(self.proc.memory_info().rss / 2**20, 1)
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.peak_mib = max(self.peak_mib, round(self.proc.memory_info().rss / 2**20, 1))
                self.stop.wait(0.05)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=0, help="Ray logical CPUs (default: os count)")
    ap.add_argument("--out", default=None, help="result JSON (default results/filter-DATE.json)")
    ap.add_argument("--child-make", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-full", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_make:
        make_table(int(args.child_make[0]), Path(args.child_make[1]))
        return 0
    if args.child_full:
        return child_full(*args.child_full)
    work = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    prepare_env(work)
    import os

    import ray
    import ray.data

    from align_ray.filter.pipeline import partitions
    from align_ray.filter.config import FilterConfig

    ray.init(address="local", num_cpus=args.cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    results = {"date": str(date.today()), "machine": machine(), "ray": ray.__version__,
               "command": " ".join(sys.argv), "sizes": []}
    for rows in args.rows:
        path = work / f"t{rows}"
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--child-make", str(rows), str(path)], check=True)
        npart = partitions(FilterConfig(), rows)
        res = {"rows": rows, "make_s": round(time.time() - t0, 1), "partitions": npart,
               "pyarrow_s": [], "counts_s": [], "full_s": []}
        table = _img_id_table(path)
        blocks = max(2, npart)
        ds = ray.data.from_arrow(table).repartition(blocks).materialize()  # not timed, as for pyarrow
        for _ in range(args.repeats):
            pa_s, pi, pt = pyarrow_counts(table)
            c_s, ri, rt = ray_counts(ds, npart)
            assert (pi, pt) == (ri, rt), ((pi, pt), (ri, rt))
            res["pyarrow_s"].append(round(pa_s, 3))
            res["counts_s"].append(round(c_s, 3))
            print(json.dumps({"rows": rows, "pyarrow_s": pa_s, "counts_s": c_s}), flush=True)
        res.update(distinct_images=pi, distinct_texts=pt)
        del table, ds
        gc.collect()
        # the full plan runs in a fresh driver process joined to the same cluster, so its RSS
        # is the plan's alone (this process holds the pyarrow baseline's memory pool)
        gcs = ray.get_runtime_context().gcs_address
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child-full", gcs, str(path),
                                  str(npart)], check=True, capture_output=True, text=True).stdout
            info = json.loads(out.strip().splitlines()[-1])
            res["full_s"].append(round(info.pop("full_s"), 3))
            res.setdefault("driver_rss_mib", []).append(info.pop("rss"))
            res.update(**info)
            print(json.dumps({"rows": rows, "full_s": res["full_s"][-1],
                              "driver_rss_mib": res["driver_rss_mib"][-1]}), flush=True)
        for k in ("pyarrow_s", "counts_s", "full_s"):
            res[k + "_median"] = statistics.median(res[k])
        res["counts_vs_pyarrow"] = round(res["counts_s_median"] / res["pyarrow_s_median"], 2)
        res["full_rows_per_s"] = round(rows / res["full_s_median"])
        res["driver_rss_peak_mib_median"] = statistics.median(r["peak"] for r in res["driver_rss_mib"])
        results["sizes"].append(res)
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}), flush=True)
    if len(results["sizes"]) >= 2:
        a, b = results["sizes"][0], results["sizes"][-1]
        results["scaling"] = {"rows_ratio": b["rows"] / a["rows"],
                              "full_time_ratio": round(b["full_s_median"] / a["full_s_median"], 2)}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"filter-{date.today()}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results.get("scaling", {})), "->", out)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
