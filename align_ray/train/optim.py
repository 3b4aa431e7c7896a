"""Optimizer and learning-rate schedule (ALIGN: LAMB, weight decay 1e-5, linear warm-up + decay).

Weight decay applies to weight matrices/kernels only: biases, norm parameters, the temperature and
the SigLIP bias (every parameter with ``ndim <= 1``, or named ``*.bias`` / ``*norm*``) get none.
LAMB's own global-norm clipping is off (``max_grad_norm=None``): the loop clips once, with
``grad_clip``.

``layer_decay`` < 1 splits the groups further by learning-rate scale: within each tower, the
groups that locking cuts (stem, blocks, head: model/locking.py) get ``layer_decay ** d``, d
counting groups below the head.  Each group's ``lr`` is the base lr times its scale, so the
schedule (a ``LambdaLR`` multiplies every group's initial lr) keeps the ratios.  At 1 the two
groups are exactly as before, so checkpoints of earlier runs resume.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from align_ray.model import locking


def no_decay(name: str, p: torch.Tensor) -> bool:
    low = name.lower()
    return (p.ndim <= 1 or low.endswith(".bias") or "norm" in low or "temperature" in low
            or "logit_bias" in low)


def layer_scales(model: nn.Module, kind: str, layer_decay: float) -> dict[str, float]:
    """Learning-rate scale of each tower parameter (name -> ``layer_decay ** d``); parameters
    not named (the temperature, SigLIP's bias) train at scale 1."""
    scales: dict[str, float] = {}
    for tower in ("image", "text"):
        gs = locking.groups(model, kind, tower)
        for depth, names in enumerate(reversed(gs)):
            scales.update(dict.fromkeys(names, layer_decay ** depth))
    return scales


def param_groups(model: nn.Module, weight_decay: float, lr: float = 1.0,
                 scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW/LAMB groups: decayed and not, then (with ``scales``) one pair per lr scale, the
    largest first; every group carries its own ``lr`` (``lr`` x scale)."""
    scales = scales or {}
    buckets: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (scales.get(name, 1.0), no_decay(name, p))
            buckets.setdefault(key, []).append(p)
    buckets.setdefault((1.0, False), [])
    buckets.setdefault((1.0, True), [])
    return [{"params": buckets[(scale, skip)], "lr": lr * scale,
             "weight_decay": 0.0 if skip else weight_decay}
            for scale, skip in sorted(buckets, key=lambda k: (-k[0], k[1]))]


def build_optimizer(model: nn.Module, cfg, kind: str = "ours") -> torch.optim.Optimizer:
    scales = layer_scales(model, kind, cfg.layer_decay) if cfg.layer_decay < 1 else None
    groups = param_groups(model, cfg.weight_decay, cfg.lr, scales)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=None)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for the update that follows ``step`` completed steps.

    ``range_test`` (the learning-rate range test, train/lr_find.py) has no warm-up: the factor
    rises geometrically from ``min_ratio`` at the first step to 1 at the last."""
    if schedule == "range_test":
        return min_ratio ** (1.0 - min(1.0, step / max(1, total - 1)))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    frac = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    else:  # linear decay (ALIGN)
        shape = 1.0 - frac
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = min(cfg.warmup_steps, max(0, cfg.steps - 1))

    def fn(step: int) -> float:
        return lr_factor(step, total=cfg.steps, warmup=warmup, schedule=cfg.schedule,
                         min_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
