"""Quality on the dev set: train split -> val split (unseen concept groups), trained vs untrained.

Trains the tiny model (ModelConfig.tiny: efficientnet_b0 at 64 px, 2-layer BERT, temperature
init 0.07) with ``align_ray.train.run`` on 2 CPU Ray Train workers, then evaluates the saved model
and an untrained one (same config, same tokenizer, random init) on the val split with
``align-ray eval``'s code: retrieval (rows of one concept match each other) and zero-shot
classification over the val labels.

    .venv/bin/python benchmarks/quality_dev.py --steps 400 --batch-size 32 --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _bench_common import DEV_SET as DEV  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEV))
    ap.add_argument("--text-col", default="alt_text")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="default: TrainConfig's")
    ap.add_argument("--optimizer", default="adamw", choices=["lamb", "adamw"])
    ap.add_argument("--temperature-init", type=float, default=0.07)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch

    from align_ray.model import DualEncoder, ModelConfig, save_pretrained
    from align_ray.model.tokenizer import load_tokenizer
    from align_ray.train.config import TrainConfig
    from align_ray.train.eval_parquet import EvalConfig, evaluate
    from align_ray.train.run import ensure_ray, run

    cfg = TrainConfig(data=[args.data], image_col="image", text_col=args.text_col,
                      split_col="dev_split", val_match_col="concept", output=args.out,
                      workers=args.workers, batch_size=args.batch_size, steps=args.steps,
                      optimizer=args.optimizer, log_every=10,
                      **({"lr": args.lr} if args.lr is not None else {}),
                      eval_every=args.eval_every, checkpoint_every=max(100, args.steps // 4),
                      model=ModelConfig.tiny(temperature_init=args.temperature_init))
    ensure_ray(cfg, "local")
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    summary = run(cfg)
    train_s = time.perf_counter() - t0
    ray.shutdown()

    model_dir = Path(args.out, "model")
    untrained_dir = Path(args.out, "untrained")
    tok = load_tokenizer(str(model_dir))
    torch.manual_seed(cfg.seed)
    fresh = DualEncoder(cfg.model, len(tok))
    save_pretrained(fresh, tok, fresh.cfg, str(untrained_dir))
    ev = dict(data=[args.data], image_col="image", text_col=args.text_col, match_col="concept",
              classify_col="label", split_col="dev_split", split="val")
    result = {"steps": args.steps, "optimizer": args.optimizer, "lr": cfg.lr, "global_batch": cfg.global_batch,
              "samples_seen": summary["samples_seen"], "train_wall_s": train_s,
              "final_loss": summary["final_loss"], "temperature": summary["temperature"],
              "trained": evaluate(EvalConfig(model=str(model_dir), **ev)),
              "untrained": evaluate(EvalConfig(model=str(untrained_dir), **ev))}
    Path(args.out, "quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
