"""The ALIGN dual encoder: config, transforms, tokenizer, model, save/load + Embedder, losses.

Names resolve lazily (PEP 562): importing a submodule such as ``align_ray.model.config`` -- which
every CLI subcommand's parser does through the stage configs -- must not import torch, timm and
transformers, a fixed cost ``align-ray data`` would otherwise pay on every run.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ModelConfig": "config",
    "DualEncoder": "dual_encoder", "unwrap": "dual_encoder",
    "ClipLoss": "loss", "SigLipLoss": "loss", "all_gather_with_grad": "loss", "build_loss": "loss",
    "Embedder": "pretrained", "load_pretrained": "pretrained", "save_pretrained": "pretrained",
    "build_tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "tokenize": "tokenizer",
    "train_wordpiece": "tokenizer",
    "MEAN": "transforms", "STD": "transforms", "decode_rgb": "transforms",
    "eval_transform": "transforms", "image_norm": "transforms", "train_transform": "transforms",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
