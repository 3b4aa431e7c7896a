"""GPU check (run on a machine with NVIDIA GPUs; CI has none):

1. exactness on nccl: W ranks (one per GPU) x batch B with gathered negatives (align_ray ClipLoss
   and SigLipLoss + DDP) give the same loss and parameter gradients as one process on the
   concatenated W*B batch, in float64 (relative error < 1e-5).  Needs >= 2 GPUs (NCCL refuses two
   ranks on one GPU); with one GPU it is reported as skipped.
2. a bf16 (autocast) training run through ``align_ray.train.run`` with W = #GPUs Ray Train
   workers (nccl), printing samples/s/GPU from the loop's own metrics.

    .venv/bin/python benchmarks/gpu_check.py --steps 60 --batch-size 128 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEV = REPO.parent / "shared/data/emoji_noto_dev.parquet"


def _exact_worker(rank: int, world: int, port: int, loss_name: str, q,
                  backend: str = "nccl") -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from align_ray.model.loss import ClipLoss, SigLipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world)
    solo = [dist.new_group([r]) for r in range(world)][rank]  # a 1-rank group: no gathering

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.img, self.txt = nn.Linear(16, 8), nn.Linear(12, 8)
            self.log_t = nn.Parameter(torch.tensor(-1.0))
            self.logit_bias = nn.Parameter(torch.tensor(-2.0))

        def forward(self, x, y):
            return (F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1),
                    self.log_t.exp())

    B = 4
    torch.manual_seed(0)
    ref = Tiny().double().to(dev)
    x_all = torch.randn(world * B, 16, dtype=torch.float64, device=dev)
    y_all = torch.randn(world * B, 12, dtype=torch.float64, device=dev)

    def make_loss(group, model):
        if loss_name == "clip":
            return ClipLoss(label_smoothing=0.1, group=group)
        return SigLipLoss(bias=model.logit_bias, group=group)

    model = Tiny().double().to(dev)
    model.load_state_dict(ref.state_dict())
    ddp = DDP(model, device_ids=[rank] if backend == "nccl" else None,
              find_unused_parameters=(loss_name == "clip"))
    sl = slice(rank * B, (rank + 1) * B)
    img, txt, t = ddp(x_all[sl], y_all[sl])
    loss = make_loss(None, model)(img, txt, t)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    ri, rt, rtemp = ref(x_all, y_all)
    ref_loss = make_loss(solo, ref)(ri, rt, rtemp)
    ref_loss.backward()
    errs = {"loss": float(abs(mean_loss - ref_loss.detach()) / abs(ref_loss.detach()))}
    for (n, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        if rp.grad is None or p.grad is None:
            continue
        errs[n] = float((p.grad - rp.grad).norm() / rp.grad.norm().clamp_min(1e-30))
    if rank == 0:
        q.put(errs)
    dist.barrier()
    dist.destroy_process_group()


def exactness(n_gpus: int, backend: str = "nccl") -> dict:
    """backend="gloo" runs the same check on CPU (a dry run of this script without GPUs)."""
    import torch.multiprocessing as mp

    if n_gpus < 2 and backend == "nccl":
        return {"skipped": "needs >= 2 GPUs (NCCL cannot put two ranks on one GPU)"}
    out = {}
    for loss_name in ("clip", "siglip"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = mp.get_context("spawn").Queue()
        mp.spawn(_exact_worker, args=(n_gpus, port, loss_name, q, backend), nprocs=n_gpus,
                 join=True)
        errs = q.get(timeout=60)
        out[loss_name] = {"max_rel_err": max(errs.values()), "ok": max(errs.values()) < 1e-5,
                          "errors": errs}
    return out


def bf16_run(args, n_gpus: int) -> dict:
    import ray

    from align_ray.model import ModelConfig
    from align_ray.train.config import TrainConfig
    from align_ray.train.run import run

    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cfg = TrainConfig(data=[args.data], image_col="image", text_col="alt_text",
                      split_col="dev_split", output=str(out), workers=n_gpus, use_gpu=True,
                      bf16=True, batch_size=args.batch_size, steps=args.steps,
                      warmup_steps=min(50, args.steps // 5), log_every=args.log_every,
                      checkpoint_every=args.steps, data_workers=args.data_workers,
                      cpus_per_worker=2, model=ModelConfig.tiny(image_size=args.image_size))
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=n_gpus, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    s = run(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["step"] > args.steps // 2]
    sps = cfg.global_batch / (sum(r["step_time_s"] for r in recs) / len(recs))
    ray.shutdown()
    return {"workers": n_gpus, "batch_per_gpu": args.batch_size, "image_size": args.image_size,
            "samples_per_s": sps, "samples_per_s_per_gpu": sps / n_gpus,
            "data_wait_s_per_step": sum(r["data_wait_s"] for r in recs) / len(recs),
            "final_loss": s["final_loss"], "val": s["eval"].get("text_to_image"),
            "run_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEV))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--data-workers", type=int, default=4)
    ap.add_argument("--skip-exactness", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise SystemExit("no CUDA device")
    result = {"gpus": n, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_exactness:
        result["exactness_nccl"] = exactness(n)
        print(json.dumps(result["exactness_nccl"]), flush=True)
    result["bf16_train"] = bf16_run(args, n)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
