"""How well the training order mixes rows across files (issue 13): the fraction of row pairs of a
batch that come from the same file, against uniform sampling (sum over files of share^2) and
against reading the files one after another.

The dev set's train split is written as ``--files`` parquet files in its own row order (rows of
one concept group sit together, so a file is "topical", as a web crawl's shard is); then each
rank's real stream (``ingest.RankStream``: Ray Data read + decode + tokenize, undecodable rows
skipped) is read for ``--epochs`` epochs and every batch's ``src_file`` column is scored, per rank
batch and per global batch (the ranks' batches of one step together).  The metadata-only order
(``DataOrder.source_files``) is scored too, over more epochs.

    .venv/bin/python benchmarks/bench_mixing.py --files 8 --windows 16 256 512 2048 8192

``at_scale``: the same figures from metadata alone for ALIGN's size (1.8 M files of 1,000 rows,
64 ranks x 64 rows), no data read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _bench_common import DEV_SET as DEV  # noqa: E402


def split_dev(data: str, files: int, out: Path) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(data, columns=["image", "alt_text", "dev_split"])
    t = t.filter(pc.equal(t["dev_split"], "train"))
    per = -(-t.num_rows // files)
    paths = []
    for f in range(files):
        p = out / f"part-{f:02d}.parquet"
        pq.write_table(t.slice(f * per, per), p, row_group_size=64)
        paths.append(str(p))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEV))
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--windows", type=int, nargs="+", default=[16, 256, 512, 2048],
                    help="shuffle_buffer values (window rows)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the real stream per window")
    ap.add_argument("--scale-files", type=int, default=1_800_000,
                    help="metadata-only run: files (ALIGN: 1.8 B pairs in 1,000-row shards)")
    ap.add_argument("--scale-rows", type=int, default=1000)
    ap.add_argument("--scale-windows", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--scale-worlds", type=int, nargs="+", default=[64])
    ap.add_argument("--scale-batch", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / f"benchmarks/results/mixing-{date.today()}.json"))
    args = ap.parse_args()

    import ray

    from _bench_common import write_json
    from align_ray.model import ModelConfig
    from align_ray.model.tokenizer import train_wordpiece
    from align_ray.train import ingest, preprocess, selection
    from align_ray.train.order import same_file_fraction, uniform_same_file_fraction
    from align_ray.train.config import TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-mixing-"))
    paths = split_dev(args.data, args.files, tmp)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    tok = preprocess.tokenizer_files(train_wordpiece(["a grinning face"] * 10, 200, 16))
    report: dict = {"data": args.data, "files": args.files, "batch_per_rank": args.batch_size,
                    "workers": args.workers, "runs": []}
    for window in args.windows:
        cfg = TrainConfig(data=paths, image_col="image", text_col="alt_text",
                          workers=args.workers, batch_size=args.batch_size,
                          shuffle_buffer=window, data_workers=args.workers, seed=0,
                          model=ModelConfig.tiny(embed_dim=16, vocab_size=200, max_length=16))
        data = ingest.train_data(cfg, paths, selection.Selection(), tokenizer=tok)
        order = data.order(args.workers)
        uniform = uniform_same_file_fraction(data.rows)
        sequential_rows = np.repeat(np.arange(len(data.rows)), data.rows)
        B, W = args.batch_size, args.workers
        n_steps = min(order.epoch_rows(e, r) for e in range(args.epochs) for r in range(W))
        n_steps = args.epochs * n_steps // B
        t0 = time.perf_counter()
        per_rank = []
        for rank in range(W):
            stream = ingest.RankStream(data, rank=rank, world=W, batch_size=B)
            it = stream.batches(n_steps)
            per_rank.append([next(it)["src_file"].numpy() for _ in range(n_steps)])
            it.close()
        secs = time.perf_counter() - t0
        rank_f = [same_file_fraction(b) for r in per_rank for b in r]
        global_f = [same_file_fraction(np.concatenate([r[g] for r in per_rank]))
                    for g in range(n_steps)]
        meta = [same_file_fraction(b) for r in range(W) for b in
                order.source_files(r, 0, 0, 40 * B * 10).reshape(-1, B)]
        seq = [same_file_fraction(sequential_rows[i:i + B * W])
               for i in range(0, len(sequential_rows) - B * W + 1, B * W)]
        run = {"shuffle_buffer": window, "slice_rows": order.slice_rows,
               "window_slices": order.window_slices, "steps": n_steps,
               "uniform": round(uniform, 4),
               "rank_batch": round(float(np.mean(rank_f)), 4),
               "global_batch": round(float(np.mean(global_f)), 4),
               "metadata_rank_batch_400": round(float(np.mean(meta)), 4),
               "files_in_sequence": round(float(np.mean(seq)), 4),
               "stream_seconds": round(secs, 1)}
        print(run, flush=True)
        report["runs"].append(run)
    ray.shutdown()
    report["at_scale"] = [at_scale(args.scale_files, args.scale_rows, w, world, args.scale_batch)
                          for w in args.scale_windows for world in args.scale_worlds]
    write_json(args.out, report)


def at_scale(files: int, rows: int, window: int, world: int, batch: int, steps: int = 16) -> dict:
    """Metadata only (DataOrder.source_files): ``files`` files of ``rows`` rows, ``world`` ranks,
    per-rank batch ``batch``: same-file fraction of rank batches and of global batches."""
    from align_ray.train.order import DataOrder, same_file_fraction, uniform_same_file_fraction

    t0 = time.perf_counter()
    order = DataOrder([rows] * files, seed=0, world=world, window_rows=window)
    src = [order.source_files(r, 0, 0, steps * batch).reshape(steps, batch) for r in range(world)]
    rank_f = [same_file_fraction(b) for r in src for b in r]
    global_f = [same_file_fraction(np.concatenate([r[g] for r in src]))
                for g in range(steps)]
    run = {"files": files, "rows_per_file": rows, "world": world, "batch_per_rank": batch,
           "shuffle_buffer": window, "slice_rows": order.slice_rows,
           "window_slices": order.window_slices,
           "uniform": uniform_same_file_fraction([rows] * files),
           "rank_batch": round(float(np.mean(rank_f)), 5),
           "global_batch": round(float(np.mean(global_f)), 6),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(run, flush=True)
    return run


if __name__ == "__main__":
    main()
