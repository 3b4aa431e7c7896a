"""MetaCLIP balancing's per-block work at MetaCLIP's metadata size: captions per second of
``balance.matches`` (normalise, word n-grams, look up in the entry set) and of ``balance.mark``
(the same plus the draws and the verdicts), one core, for 500 k entries of 1-3 words.

Captions are the dev set's alt-texts, repeated to the block size; entries are synthetic
(the dev set's words and word pairs first, then made-up words), so a realistic share of
n-grams hit.  The median of --repeats timed runs per block size.

    .venv/bin/python benchmarks/bench_balance.py --entries 500000 --rows 100000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from align_ray.filter import balance
from align_ray.filter.rules import tokens

REPO = Path(__file__).resolve().parents[1]
from _bench_common import DEV_SET as DEV  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=500_000)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    texts = pq.read_table(DEV, columns=["alt_text"]).column("alt_text").combine_chunks()
    caps = pa.array((texts.to_pylist() * (a.rows // len(texts) + 1))[:a.rows], pa.string())
    parent, toks = tokens(texts)
    words = list(dict.fromkeys(toks.to_pylist()))
    pairs = [f"{x} {y}" for x, y in zip(toks.to_pylist(), toks.to_pylist()[1:])]
    made = [f"w{i} x{i % 997}" if i % 3 else f"w{i}" for i in range(a.entries)]
    entries = pa.array(list(dict.fromkeys(words + pairs + made))[:a.entries], pa.string())
    key = pa.array(np.arange(a.rows, dtype=np.int64))
    batch = pa.table({"key_id": key, "text": caps})
    counts = np.zeros(len(entries), np.int64)
    _, ids = balance.matches(caps, entries)
    np.add.at(counts, ids, 1)
    res = {"entries": len(entries), "rows": a.rows, "matches": int(len(ids)),
           "rows_matching": int(len(np.unique(balance.matches(caps, entries)[0])))}
    for name, fn in (("matches", lambda: balance.matches(caps, entries)),
                     ("mark", lambda: balance.mark(batch, entries, counts, 20_000, 0))):
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        res[f"{name}_rows_per_s"] = round(a.rows / statistics.median(times))
        res[f"{name}_s"] = [round(x, 3) for x in times]
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
