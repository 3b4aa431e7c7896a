"""Training quality: align-ray against a plain single-process PyTorch loop at equal compute.

Both sides train the same towers (timm efficientnet_b0 at 64 px, a 2-layer h=128 BERT on a
WordPiece vocabulary trained on the training captions), on the dev set's train split, with the same
global batch, steps, label-smoothed symmetric InfoNCE (open_clip's ``ClipLoss`` logits and labels),
AdamW, warm-up then linear decay and temperature init.  The plain side builds its model from timm
and transformers directly, samples batches uniformly at random from decoded images in memory and
flips horizontally; the align-ray side is the real ``align-ray train`` CLI in a subprocess, with no
tuning flags unless ``--ar-flags`` adds some.  Both are scored on the val split (concept groups never
seen in training; rows of one concept match each other) as R@1/5/10 multiples of chance, and both
loss curves go in one PNG.

    .venv/bin/python benchmarks/quality_vs_plain.py --steps 300 --batch 128 --seeds 0 1 2
    .venv/bin/python benchmarks/quality_vs_plain.py --only plain --steps 60   # one side

``--plain-image-model`` / ``--plain-image-pretrained`` and ``--plain-crop-scale`` /
``--plain-color-jitter`` / ``--plain-grayscale`` give the plain side the towers and augmentation
of an align-ray run set with ``--ar-set`` (torchvision's transforms, as a plain loop writes them).

Writes benchmarks/results/quality-vs-plain-<date>.json (+ .png next to it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _bench_common import DEV_SET as DEV  # noqa: E402
KS = (1, 5, 10)


def load_split(path: str, split: str, text_col: str) -> tuple[list[bytes], list[str], list[str]]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["image", text_col, "dev_split", "concept"]).to_pydict()
    idx = [i for i, s in enumerate(t["dev_split"]) if s == split]
    return [t["image"][i] for i in idx], [t[text_col][i] for i in idx], [t["concept"][i] for i in idx]


def decode(images: list[bytes], size: int) -> np.ndarray:
    """uint8 [N, 3, size, size]; the dev set is 64 px RGB already (resize only if it is not)."""
    from PIL import Image

    out = []
    for b in images:
        im = Image.open(io.BytesIO(b)).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im).transpose(2, 0, 1))
    return np.stack(out)


def build_plain_model(vocab: int, embed_dim: int, temperature_init: float,
                      image_model: str = "efficientnet_b0", image_pretrained: str | None = None):
    import timm
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # a pretrained file the way timm users load one (timm drops the classifier)
            self.image = timm.create_model(
                image_model, pretrained=bool(image_pretrained), num_classes=0,
                **({"pretrained_cfg_overlay": {"file": image_pretrained}} if image_pretrained else {}))
            self.image_proj = nn.Linear(self.image.num_features, embed_dim)
            self.text = BertModel(BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=512,
                                             max_position_embeddings=128), add_pooling_layer=False)
            self.text_proj = nn.Linear(128, embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature_init)))

        def encode_image(self, x):
            return nn.functional.normalize(self.image_proj(self.image(x)), dim=-1)

        def encode_text(self, ids, mask):
            h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            return nn.functional.normalize(self.text_proj(h), dim=-1)

    return Plain()


def smoothed_clip_loss(label_smoothing: float):
    """open_clip's ``ClipLoss`` (its logits and labels) with label-smoothed cross-entropy."""
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    class Smoothed(ClipLoss):
        def forward(self, img, txt, logit_scale):
            li, lt = self.get_logits(img, txt, logit_scale)
            labels = self.get_ground_truth(img.device, li.shape[0])
            return 0.5 * (F.cross_entropy(li, labels, label_smoothing=label_smoothing)
                          + F.cross_entropy(lt, labels, label_smoothing=label_smoothing))

    return Smoothed()


def align_ray_order(n: int, seed: int, world: int, rows: int) -> list:
    """Per rank, an endless iterator of ``rows``-row batches of row indices in align-ray's
    epoch order over ``n`` rows in one file (order.DataOrder with the default
    ``shuffle_buffer``, not resampled: align-ray's default before session 34, and its order on
    data larger than a window), to tell the order's effect from everything else."""
    from align_ray.train.config import TrainConfig
    from align_ray.train.order import DataOrder, window_order

    order = DataOrder([n], seed=seed, world=world, window_rows=TrainConfig().shuffle_buffer)

    def stream(rank: int):
        epoch, buf = 0, np.zeros(0, np.int64)
        while True:
            for it in order.windows(rank, epoch, 0, order.epoch_rows(epoch, rank)):
                if it["epoch"] != epoch:
                    break
                pos = np.concatenate([s + np.arange(m) for s, m in zip(it["start"], it["len"])])
                buf = np.concatenate([buf, pos[window_order(seed, epoch, rank, it["window"],
                                                            len(pos))]])
                while len(buf) >= rows:
                    yield buf[:rows]
                    buf = buf[rows:]
            epoch += 1

    return [stream(r) for r in range(world)]


def plain_augment(args, size: int):
    """torchvision's per-image crop / colour jitter / grayscale on uint8 tensors, as a plain loop
    would write it (the hue range matches align-ray's jitter / 8), or None when all are off."""
    if args.plain_crop_scale >= 1 and not args.plain_color_jitter and not args.plain_grayscale:
        return None
    from torchvision.transforms import v2

    s = args.plain_color_jitter
    return v2.Compose([v2.RandomResizedCrop(size, scale=(args.plain_crop_scale, 1.0), antialias=True),
                       v2.ColorJitter(s, s, s, s / 8), v2.RandomGrayscale(args.plain_grayscale)])


def plain_run(args, seed: int) -> dict:
    """The 40-line loop: uniform random batches, hflip, AdamW, warm-up + linear decay."""
    import torch

    from align_ray.model.tokenizer import train_wordpiece

    torch.manual_seed(seed)
    imgs, texts, _ = load_split(args.data, "train", args.text_col)
    tok = train_wordpiece(texts, 4000, 64)
    pixels = torch.from_numpy(decode(imgs, 64))
    enc = tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt",
              return_token_type_ids=False)
    model = build_plain_model(len(tok), 128, args.temperature_init, args.plain_image_model,
                              args.plain_image_pretrained)
    augment = plain_augment(args, pixels.shape[-1])
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    warm = args.warmup

    def factor(s: int) -> float:
        return (s + 1) / warm if s < warm else max(0.0, 1 - (s - warm) / max(1, args.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_fn = smoothed_clip_loss(0.1)
    g = torch.Generator().manual_seed(seed)
    curve, win, t0 = [], [], time.perf_counter()
    model.train()
    ranked = align_ray_order(len(texts), seed, args.workers, args.batch // args.workers) \
        if args.plain_order == "align_ray" else None
    epoch_batches: list = []
    for step in range(1, args.steps + 1):
        if ranked is not None:
            idx = torch.from_numpy(np.concatenate([next(r) for r in ranked]))
        elif args.plain_order == "epoch":
            if not epoch_batches:
                perm = torch.randperm(len(texts), generator=g)
                epoch_batches = list(perm[: len(perm) // args.batch * args.batch].split(args.batch))
            idx = epoch_batches.pop(0)
        elif args.with_replacement:
            idx = torch.randint(len(texts), (args.batch,), generator=g)
        else:
            idx = torch.randperm(len(texts), generator=g)[: args.batch]
        px = pixels[idx].clone()
        flip = torch.rand(len(idx), generator=g) < 0.5
        px[flip] = px[flip].flip(-1)
        if augment is not None:
            px = torch.stack([augment(p) for p in px])
        x = (px.float() / 255 - mean) / std
        bn = args.plain_bn_rows or len(x)
        img = torch.cat([model.encode_image(c) for c in x.split(bn)])
        loss = loss_fn(img, model.encode_text(enc["input_ids"][idx],
                                                                enc["attention_mask"][idx]),
                       model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        win.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps:
            curve.append({"step": step, "loss": float(np.mean(win))})
            print(f"plain seed {seed} step {step} loss {curve[-1]['loss']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            win = []
    train_s = time.perf_counter() - t0
    model.eval()
    from align_ray.train.evaluate import retrieval_metrics

    def score(path: str, split: str) -> dict:
        vimgs, vtexts, vconcepts = load_split(path, split, args.text_col)
        with torch.no_grad():
            vx = (torch.from_numpy(decode(vimgs, 64)).float() / 255 - mean) / std
            venc = tok(vtexts, padding=True, truncation=True, max_length=64, return_tensors="pt",
                       return_token_type_ids=False)
            ie = model.encode_image(vx).numpy()
            te = model.encode_text(venc["input_ids"], venc["attention_mask"]).numpy()
        return retrieval_metrics(ie, te, vconcepts)

    return {"curve": curve, "train_s": train_s, "eval": score(args.data, "val"),
            "renderings": renderings(args, score)}


def renderings(args, score) -> dict:
    """Retrieval on the same concepts drawn by other artists (other_renderings.py): the val
    concepts (unseen concepts, unseen style) and the train concepts (seen concepts, unseen style)."""
    return {Path(p).stem: {split: score(p, split) for split in ("val", "train")}
            for p in args.renderings}


def align_ray_run(args, seed: int, out: Path) -> dict:
    """The real CLI, one subprocess (its own local Ray), then ``align-ray eval`` on the val split."""
    run_dir = out / f"ar-seed{seed}"
    # A fresh run every time: `align-ray train` resumes from a run directory's checkpoints, so a
    # variant run into an earlier run's directory would report that run's model.
    if run_dir.exists():
        print(f"removing the earlier run in {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "align_ray.cli", "train", "--data", args.data,
           "--image-col", "image", "--text-col", args.text_col, "--split-col", "dev_split",
           "--output", str(run_dir), "--workers", str(args.workers),
           "--batch-size", str(args.batch // args.workers), "--steps", str(args.steps),
           "--ray-address", "local"]
    # seed and the val match column have no CLI flags; --ar-set adds TrainConfig keys (a sweep)
    cfg = run_dir.with_suffix(".yaml")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("".join(f"{line}\n" for line in
                           [f"seed: {seed}", "val_match_col: concept", *args.ar_set]))
    cmd += ["--config", str(cfg), *shlex.split(args.ar_flags)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=str(REPO), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    from align_ray.train.eval_parquet import EvalConfig, evaluate

    def score(path: str, split: str) -> dict:
        return evaluate(EvalConfig(model=str(run_dir / "model"), data=[path], image_col="image",
                                   text_col=args.text_col, match_col="concept",
                                   split_col="dev_split", split=split))
    curve = [{"step": r["step"], "loss": r["loss"]}
             for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    return {"curve": curve, "wall_s": wall, "eval": score(args.data, "val"),
            "renderings": renderings(args, score), "run_dir": str(run_dir)}


def x_chance(ev: dict) -> dict:
    return {d: {f"R@{k}": ev[d][f"R@{k}"] / ev["chance"][f"R@{k}"] for k in KS}
            for d in ("image_to_text", "text_to_image")}


def median_x(runs: list[dict]) -> dict:
    med = {d: {f"R@{k}": float(np.median([r["x_chance"][d][f"R@{k}"] for r in runs])) for k in KS}
           for d in ("image_to_text", "text_to_image")}
    for name in runs[0].get("renderings") or {}:
        med[name] = {split: {d: {f"R@{k}": float(np.median(
            [x_chance(r["renderings"][name][split])[d][f"R@{k}"] for r in runs])) for k in KS}
            for d in ("image_to_text", "text_to_image")} for split in ("val", "train")}
    return med


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, color in (("plain", "tab:blue"), ("align_ray", "tab:orange")):
        for i, r in enumerate(result.get(side, {}).get("runs", [])):
            c = r["curve"]
            ax.plot([p["step"] for p in c], [p["loss"] for p in c], color=color, alpha=0.8,
                    label=side if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"global batch {result['batch']}, {result['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def merge(args) -> None:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    keys = ("steps", "batch", "workers")
    if len({tuple(p[k] for k in keys) for p in parts}) != 1:
        raise SystemExit(f"results differ in {keys}; not one setting")
    result = {**{k: parts[0][k] for k in keys}, "merged_from": [Path(f).name for f in args.merge],
              **{k: [p.get(k) for p in parts] for k in ("date", "ar_set", "seeds")}}
    for side in ("plain", "align_ray"):
        runs = [r for p in parts for r in p.get(side, {}).get("runs", [])]
        if runs:
            result[side] = {"runs": runs, "median_x_chance": median_x(runs)}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    dest = Path(args.results) / f"quality-vs-plain-{stamp}{'-' + args.tag if args.tag else ''}.json"
    dest.write_text(json.dumps(result, indent=1))
    plot(result, dest.with_suffix(".png"))
    print(json.dumps({k: v["median_x_chance"] for k, v in result.items()
                      if isinstance(v, dict) and "median_x_chance" in v}, indent=1))
    print("wrote", dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEV))
    ap.add_argument("--text-col", default="alt_text")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128, help="global batch (both sides)")
    ap.add_argument("--workers", type=int, default=2, help="align-ray workers")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr", type=float, default=1e-3, help="plain loop")
    ap.add_argument("--warmup", type=int, default=30, help="plain loop")
    ap.add_argument("--temperature-init", type=float, default=0.07, help="plain loop")
    ap.add_argument("--with-replacement", action="store_true", help="plain loop sampling")
    ap.add_argument("--plain-order", choices=["uniform", "align_ray", "epoch"], default="uniform",
                    help="plain loop batches: uniform random rows (a fresh draw every step), "
                         "align-ray's epoch order (order.DataOrder: per-rank shuffle windows "
                         "of file slices, --workers ranks of batch/workers rows each, "
                         "concatenated), or epoch: one permutation per epoch cut into batches, "
                         "its remainder dropped (random reshuffling, no row twice in a batch)")
    ap.add_argument("--plain-bn-rows", type=int, default=0,
                    help="plain loop: BatchNorm statistics over groups of this many rows (what W "
                         "workers of that many rows each see without SyncBatchNorm); 0 = the batch")
    ap.add_argument("--plain-image-model", default="efficientnet_b0", help="plain loop: timm name")
    ap.add_argument("--plain-image-pretrained", default=None, metavar="FILE",
                    help="plain loop: a timm checkpoint for the image tower (e.g. the file "
                         "benchmarks/pretrained_image_tower.py writes)")
    ap.add_argument("--plain-crop-scale", type=float, default=1.0,
                    help="plain loop: random resized crop, area from this to 1 (1 = off)")
    ap.add_argument("--plain-color-jitter", type=float, default=0.0, help="plain loop")
    ap.add_argument("--plain-grayscale", type=float, default=0.0, help="plain loop")
    ap.add_argument("--ar-flags", default="", help="extra align-ray train flags")
    ap.add_argument("--ar-set", nargs="*", default=[],
                    help="TrainConfig YAML lines for align-ray, e.g. 'grad_clip: 1.0'")
    ap.add_argument("--renderings", nargs="*", default=[], metavar="PARQUET",
                    help="also score on these sets of the same concepts in other art styles "
                         "(benchmarks/other_renderings.py builds them), val and train splits")
    ap.add_argument("--only", choices=["plain", "align_ray"])
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", default="/tmp/quality-vs-plain")
    ap.add_argument("--results", default=str(REPO / "benchmarks/results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="combine results files of one setting (e.g. sides run in parallel) into "
                         "one file + one PNG, nothing trained")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "steps": args.steps, "batch": args.batch, "workers": args.workers,
                    "seeds": args.seeds, "plain_lr": args.lr, "plain_warmup": args.warmup,
                    "plain_bn_rows": args.plain_bn_rows, "plain_order": args.plain_order,
                    "plain_image_model": args.plain_image_model,
                    "plain_image_pretrained": args.plain_image_pretrained,
                    "plain_aug": [args.plain_crop_scale, args.plain_color_jitter,
                                  args.plain_grayscale],
                    "ar_flags": args.ar_flags, "ar_set": args.ar_set, "tag": args.tag,
                    "renderings": [Path(p).name for p in args.renderings],
                    "cpus": os.cpu_count()}
    for side in ("plain", "align_ray"):
        if args.only and side != args.only:
            continue
        runs = []
        for seed in args.seeds:
            r = plain_run(args, seed) if side == "plain" else align_ray_run(args, seed, out)
            r["seed"], r["x_chance"] = seed, x_chance(r["eval"])
            print(side, seed, json.dumps(r["x_chance"]), flush=True)
            runs.append(r)
        result[side] = {"runs": runs, "median_x_chance": median_x(runs)}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    dest = Path(args.results) / f"quality-vs-plain-{stamp}{'-' + args.tag if args.tag else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1))
    plot(result, dest.with_suffix(".png"))
    print(json.dumps({k: v["median_x_chance"] for k, v in result.items()
                      if isinstance(v, dict) and "median_x_chance" in v}, indent=1))
    print("wrote", dest)


if __name__ == "__main__":
    main()
