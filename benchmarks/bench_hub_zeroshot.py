"""Zero-shot accuracy of a published dual encoder from the Hugging Face hub through align-ray's
own ``load_embedder`` (the path eval, index and serve use), on a small public set, next to the
figure its model card reports.

    .venv/bin/python benchmarks/bench_hub_zeroshot.py --model kakaobrain/align-base \\
        --dataset cifar10 --card-top1 FIGURE_FROM_THE_MODEL_CARD --json benchmarks/results/hub-zeroshot-DATE.json

Where the hub or the dataset's host is unreachable (as on the development machine, where no
packet may leave loopback) it does not try to work around that: it writes
``{"skipped": reason}`` to ``--json``, says so, and exits 0.  ``HF_HUB_OFFLINE=1`` makes it skip
without touching the network.  The model card's figure is passed by hand (``--card-top1``):
cards are prose, and the number depends on the card's own prompts and split.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.")


def _skip(path: str, reason: str) -> int:
    print(f"SKIPPED: {reason}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"skipped": reason, "date": time.strftime("%Y-%m-%d")}, indent=1))
    return 0


def _dataset(name: str, root: Path, n: int):
    """(images as PNG bytes, labels, class names) of the first ``n`` test images."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    ds = cls(str(root), train=False, download=True)
    images, labels = [], []
    for i in range(min(n, len(ds))):
        img, y = ds[i]
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append(buf.getvalue())
        labels.append(int(y))
    return images, np.array(labels), list(ds.classes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="kakaobrain/align-base", help="a hub name of an HF dual encoder")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    p.add_argument("--n", type=int, default=2000, help="test images used")
    p.add_argument("--card-top1", type=float, default=None, help="the model card's top-1 (%%)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "align-ray-bench"))
    p.add_argument("--json", required=True)
    args = p.parse_args()

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return _skip(args.json, "HF_HUB_OFFLINE=1: the hub is not to be contacted")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(args.model, cache_dir=args.cache, etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure to reach the hub means: skip, and say why
        return _skip(args.json, f"hub unreachable for {args.model}: {type(e).__name__}: {e}"[:500])
    try:
        images, labels, classes = _dataset(args.dataset, Path(args.cache) / args.dataset, args.n)
    except Exception as e:  # noqa: BLE001
        return _skip(args.json, f"{args.dataset} unreachable: {type(e).__name__}: {e}"[:500])

    from align_ray.model.pretrained import load_embedder

    t0 = time.time()
    emb = load_embedder(local, batch_size=32)
    prompts = [t.format(c.replace("_", " ")) for c in classes for t in TEMPLATES]
    txt = emb.embed_texts(prompts).reshape(len(classes), len(TEMPLATES), -1).mean(1)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    img = emb.embed_images(images)
    pred = (img @ txt.T).argmax(1)
    top1 = float((pred == labels).mean() * 100)
    report = {"model": args.model, "dataset": args.dataset, "images": len(images),
              "templates": list(TEMPLATES), "top1": round(top1, 2), "card_top1": args.card_top1,
              "difference": None if args.card_top1 is None else round(top1 - args.card_top1, 2),
              "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
