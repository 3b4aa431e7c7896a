"""GradCache (``accum_steps``) memory and throughput: the real training step
(``align_ray.train.step.train_step``) in one process, ``ModelConfig.tiny()`` (efficientnet_b0 at
64 px + 2-layer BERT), AdamW, train mode, synthetic uint8 pixels and random tokens (no decode: the
step alone).

Each configuration runs in a fresh process: the peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model, optimizer and batches are built) minus the RSS then is
the steps' working memory (activations, gradients, AdamW state): a peak over all steps, warm-up
included (only the warm-up is not timed).  samples/s count the step's global batch
(``batch x accum``).  Default configurations: micro-batch B with accum 1, B with accum 4 (4x the
negatives at about the memory of B), and 4B with accum 1 (the same global batch the plain way).

    .venv/bin/python benchmarks/bench_gradcache.py --batch-size 32 --steps 6 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _run(batch: int, accum: int, args, q) -> None:
    import torch

    from align_ray.model import DualEncoder, ModelConfig, build_loss
    from align_ray.train import step as step_lib
    from align_ray.train.config import TrainConfig
    from align_ray.model.transforms import image_norm
    from align_ray.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mc = ModelConfig.tiny()
    cfg = TrainConfig(data=["x"], workers=1, batch_size=batch, accum_steps=accum,
                      steps=args.steps, warmup_steps=1, model=mc)
    model = DualEncoder(mc, mc.vocab_size).train()
    opt, loss_fn = build_optimizer(model, cfg), build_loss(mc, model)
    sched = build_scheduler(opt, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255.0 for v in image_norm(mc))
    g = torch.Generator().manual_seed(1)

    def micro_batch() -> dict:
        ids = torch.randint(5, mc.vocab_size, (batch, mc.max_length), generator=g)
        ids[:, 0] = 2
        return {"pixels": torch.randint(0, 256, (batch, 3, mc.image_size, mc.image_size),
                                        generator=g, dtype=torch.uint8),
                "input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def inputs(b: dict):
        return (b["pixels"].float() - mean) / std, b["input_ids"], b["attention_mask"]

    data = [[micro_batch() for _ in range(accum)] for _ in range(args.steps)]
    rss0 = _status_kib("VmRSS")  # model, optimizer (no state yet) and data built
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    for s in range(args.warmup):
        step_lib.train_step(model, loss_fn, data[s], inputs, opt, sched, params, 0.0)
    t0 = time.perf_counter()
    losses = []
    for s in range(args.warmup, args.steps):
        res = step_lib.train_step(model, loss_fn, data[s], inputs, opt, sched, params, 0.0)
        losses.append(float(res.loss))
    dt = time.perf_counter() - t0
    timed = args.steps - args.warmup
    q.put({"batch": batch, "accum_steps": accum, "global_batch": batch * accum,
           "timed_steps": timed, "seconds": dt, "step_time_s": dt / timed,
           "samples_per_s": timed * batch * accum / dt,
           "rss_before_mib": rss0 / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024,
           "steps_peak_over_rss_mib": (_status_kib("VmHWM") - rss0) / 1024,
           "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "losses": losses})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=32, help="micro-batch B")
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = ap.parse_args()
    B, K = args.batch_size, args.accum
    ctx = mp.get_context("spawn")
    result = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "threads": args.threads,
              "model": "ModelConfig.tiny() (efficientnet_b0 @ 64 px + 2-layer BERT h=128)",
              "loadavg_start": os.getloadavg(), "runs": []}
    for batch, accum in ((B, 1), (B, K), (B * K, 1)):
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(batch, accum, args, q))
        p.start()
        rec = q.get()
        p.join()
        rec["loadavg_after"] = os.getloadavg()
        print(json.dumps({k: v for k, v in rec.items() if k != "losses"}), flush=True)
        result["runs"].append(rec)
    result["loadavg_end"] = os.getloadavg()
    out = Path(args.out) / f"gradcache-{time.strftime('%Y-%m-%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(out)


if __name__ == "__main__":
    main()
