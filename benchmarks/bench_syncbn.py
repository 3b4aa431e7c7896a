"""What ``sync_bn`` costs on CPU: seconds per training step, 2 gloo processes x batch B, with
per-worker BatchNorm and with train/syncbn.py, interleaved (off, on, off, on, ...) so that both
sides see the same machine load.  The model is the default tiny preset (efficientnet_b0 at 64 px,
2-layer BERT), the step is the real one (``train/step.py``: DDP, gathered-negative loss, AdamW).

    .venv/bin/python benchmarks/bench_syncbn.py --batch 64 --steps 6 --rounds 3

Writes benchmarks/results/syncbn-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from align_ray.model import DualEncoder, ModelConfig, build_loss
    from align_ray.train import step as step_lib
    from align_ray.train import syncbn
    from align_ray.train.config import TrainConfig
    from align_ray.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    group = syncbn.new_group()
    g = torch.Generator().manual_seed(rank)
    B = args.batch
    batch = {"pixels": torch.randn(B, 3, 64, 64, generator=g),
             "input_ids": torch.randint(5, 4000, (B, 24), generator=g),
             "attention_mask": torch.ones(B, 24, dtype=torch.long)}
    times: dict[str, list[float]] = {"per_worker": [], "sync_bn": []}
    for _ in range(args.rounds):
        for side in times:
            torch.manual_seed(0)
            model = DualEncoder(ModelConfig.tiny(), 4000)
            if side == "sync_bn":
                model = syncbn.convert(model, group)
            ddp = DDP(model)
            cfg = TrainConfig(data=["x"], steps=args.steps, warmup_steps=1, model=ModelConfig.tiny())
            opt = build_optimizer(model, cfg)
            sched = build_scheduler(opt, cfg)
            loss_fn = build_loss(model.cfg, ddp)
            params = [p for p in ddp.parameters() if p.requires_grad]
            ddp.train()

            def inputs(b):
                return b["pixels"], b["input_ids"], b["attention_mask"]

            step_lib.train_step(ddp, loss_fn, [batch], inputs, opt, sched, params, 0.0)  # warm
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step_lib.train_step(ddp, loss_fn, [batch], inputs, opt, sched, params, 0.0)
            dist.barrier()
            times[side].append((time.perf_counter() - t0) / args.steps)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="rows per process")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    tmp = Path(f"/tmp/bench-syncbn-{os.getpid()}.json")
    mp.spawn(_worker, args=(args.world, _port(), args, str(tmp)), nprocs=args.world, join=True)
    times = json.loads(tmp.read_text())
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "cpus": os.cpu_count(), "load_avg": os.getloadavg(), **vars(args),
           "s_per_step": times,
           "median_s_per_step": {k: statistics.median(v) for k, v in times.items()}}
    m = res["median_s_per_step"]
    res["sync_bn_over_per_worker"] = m["sync_bn"] / m["per_worker"]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    dest = REPO / f"benchmarks/results/syncbn-{stamp}.json"
    dest.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["median_s_per_step"]), f"ratio {res['sync_bn_over_per_worker']:.2f}")
    print("wrote", dest)


if __name__ == "__main__":
    main()
