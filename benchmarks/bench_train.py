"""Training throughput: our Ray Train loop vs a plain 2-process torch.distributed (gloo) loop that
uses open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``.

Same model (ModelConfig.tiny: efficientnet_b0 at 64 px + 2-layer 128-wide BERT), same per-worker
batch, optimizer (LAMB), grad clipping, 1 torch thread per worker (Ray Train's OMP default), same
rows (the dev set's train split).  Decoding/augmenting/tokenizing happens off the trainer in both:
Ray Data actors (ours) vs one torch DataLoader worker process per rank (plain).  Samples/s are
global (both workers) over the steps after ``--warmup``; ours comes from the loop's own
metrics.jsonl (every ``--log-every`` steps).  Goal: ours >= 0.9 x plain.

``--order auto epochs`` runs our loop once per data order, between two runs of the plain loop
(before and after): each order's ratio is to the mean of the two, so a box whose speed drifts
during the invocation is seen (the two plain figures) and shared by both orders.

    .venv/bin/pip install --no-deps open-clip-torch    # benchmark-only dependency
    .venv/bin/python benchmarks/bench_train.py --steps 60 --warmup 20 --batch-size 32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _bench_common import DEV_SET as DEV  # noqa: E402


def open_clip_loss_cls():
    """open_clip's ClipLoss without importing the package (its __init__ needs ftfy etc.)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps open-clip-torch (benchmark-only dependency)")
    path = Path(list(spec.submodule_search_locations)[0], "loss.py")
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.ClipLoss


def load_rows(data: str, image_col: str, text_col: str, split_col: str | None, split: str):
    import pyarrow.parquet as pq

    cols = [image_col, text_col] + ([split_col] if split_col else [])
    t = pq.read_table(data, columns=cols).to_pydict()
    keep = [i for i in range(len(t[text_col])) if not split_col or t[split_col][i] == split]
    return [t[image_col][i] for i in keep], [t[text_col][i] for i in keep]


class PairDataset:
    """torch map-style dataset: decode + random resized crop/flip + tokenize (in a worker proc)."""

    def __init__(self, images, texts, tok_files, model_cfg):
        self.images, self.texts, self.tok_files, self.cfg = images, texts, tok_files, model_cfg
        self.tok = self.transform = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from align_ray.model.transforms import decode_rgb, train_transform
        from align_ray.model.transforms import image_norm
        from align_ray.train.preprocess import tokenizer_from_files

        if self.tok is None:
            self.tok = tokenizer_from_files(self.tok_files, self.cfg.max_length)
            self.transform = train_transform(self.cfg.image_size, *image_norm(self.cfg))
        enc = self.tok(self.texts[i], padding="max_length", truncation=True,
                       max_length=self.cfg.max_length, return_tensors="pt",
                       return_token_type_ids=False)
        import torch

        return (torch.from_numpy(self.transform(decode_rgb(self.images[i]))),
                enc["input_ids"][0], enc["attention_mask"][0])


def _plain_worker(rank: int, world: int, port: int, args, tok_files, vocab, images, texts, q):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from align_ray.model import DualEncoder, ModelConfig
    from align_ray.train.config import TrainConfig
    from align_ray.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(data=["x"], batch_size=args.batch_size, workers=world, steps=args.steps,
                      warmup_steps=min(50, args.steps // 5), model=ModelConfig.tiny())
    torch.manual_seed(cfg.seed)
    model = DDP(DualEncoder(cfg.model, vocab))
    opt, ClipLoss = build_optimizer(model.module, cfg), open_clip_loss_cls()
    sched = build_scheduler(opt, cfg)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    ds = PairDataset(images[rank::world], texts[rank::world], tok_files, cfg.model)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True, num_workers=1, persistent_workers=True)
    step, t0 = 0, None
    while step < args.steps:
        for pixels, ids, mask in loader:
            img, txt, temp = model(pixels, ids, mask)
            loss = loss_fn(img, txt, 1.0 / temp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step == args.warmup:
                dist.barrier()
                t0 = time.perf_counter()
            if step == args.steps:
                break
    dist.barrier()
    if rank == 0:
        dt = time.perf_counter() - t0
        q.put({"samples_per_s": (args.steps - args.warmup) * cfg.batch_size * world / dt,
               "timed_steps": args.steps - args.warmup, "seconds": dt})
    dist.destroy_process_group()


def run_plain(args, tok_files, vocab, images, texts) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_plain_worker, args=(args.workers, port, args, tok_files, vocab, images, texts, q),
             nprocs=args.workers, join=True)
    return q.get(timeout=10)


def run_ray(args, workdir: Path, order: str) -> dict:
    import ray

    from align_ray.model import ModelConfig
    from align_ray.train.config import TrainConfig
    from align_ray.train.run import ensure_ray, run

    cfg = TrainConfig(data=[args.data], image_col=args.image_col, text_col=args.text_col,
                      split_col=None, output=str(workdir / f"ray-run-{order}"),
                      workers=args.workers,
                      batch_size=args.batch_size, steps=args.steps,
                      warmup_steps=min(50, args.steps // 5), checkpoint_every=args.steps,
                      log_every=args.log_every, data_workers=args.workers,
                      model=ModelConfig.tiny(),
                      resampled=None if order == "auto" else False)
    if args.split_col:  # train rows only, like the plain loop (no val set: nothing but training)
        cfg.data = [str(workdir / "train.parquet")]
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - t
    recs = [r for r in map(json.loads, Path(cfg.output, "metrics.jsonl").read_text().splitlines())
            if "loss" in r and r["step"] > args.warmup]
    steps = sum(args.log_every for _ in recs)
    secs = sum(r["step_time_s"] * args.log_every for r in recs)
    ray.shutdown()
    return {"samples_per_s": steps * cfg.global_batch / secs, "timed_steps": steps,
            "seconds": secs,
            "data_wait_s_per_step": sum(r["data_wait_s"] for r in recs) / len(recs),
            "run_wall_s": wall, "final_loss": summary["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEV))
    ap.add_argument("--image-col", default="image")
    ap.add_argument("--text-col", default="alt_text")
    ap.add_argument("--split-col", default="dev_split")
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--only", choices=["plain", "ray"])
    ap.add_argument("--order", choices=["auto", "epochs"], nargs="+", default=["auto"],
                    help="align-ray's data order: the default (resampled on data this small) "
                         "and/or epochs; with two, each runs once, between two plain runs")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = ap.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every:
        raise SystemExit("--warmup and --steps must be multiples of --log-every")

    from _bench_common import prepare_env

    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    prepare_env(workdir)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from align_ray.model import ModelConfig
    from align_ray.model.tokenizer import train_wordpiece
    from align_ray.train.preprocess import tokenizer_files

    images, texts = load_rows(args.data, args.image_col, args.text_col, args.split_col, args.split)
    pq.write_table(pa.table({args.image_col: pa.array(images, pa.binary()), args.text_col: texts}),
                   workdir / "train.parquet")
    mc = ModelConfig.tiny()
    tok = train_wordpiece(texts, mc.vocab_size, mc.max_length)
    result = {"rows": len(images), "workers": args.workers, "batch_per_worker": args.batch_size,
              "steps": args.steps, "warmup": args.warmup, "cpus": os.cpu_count(),
              "order": "-".join(args.order), "loadavg_start": os.getloadavg()}

    def plain(key: str) -> None:
        result[key] = run_plain(args, tokenizer_files(tok), len(tok), images, texts)
        print(json.dumps(result[key]), flush=True)

    if args.only != "ray":
        plain("plain_gloo_open_clip")
    if args.only != "plain":
        for order in args.order:
            key = "ray_train" if len(args.order) == 1 else f"ray_train_{order}"
            result[key] = run_ray(args, workdir, order)
            print(json.dumps(result[key]), flush=True)
    if args.only is None and len(args.order) > 1:
        plain("plain_gloo_open_clip_after")
        ref = (result["plain_gloo_open_clip"]["samples_per_s"]
               + result["plain_gloo_open_clip_after"]["samples_per_s"]) / 2
        result["ratio_by_order"] = {o: result[f"ray_train_{o}"]["samples_per_s"] / ref
                                    for o in args.order}
    elif args.only is None:
        result["ratio_ray_over_plain"] = (result["ray_train"]["samples_per_s"]
                                          / result["plain_gloo_open_clip"]["samples_per_s"])
    result["loadavg_end"] = os.getloadavg()
    out = Path(args.out) / f"train-{result['order']}-{time.strftime('%Y-%m-%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
