"""LiT-style tower locking (``lock_image`` / ``lock_text``), for our DualEncoder and the published
models that ``train --init-from`` fine-tunes (align_ray/model/finetune.py).

A tower is cut into *groups*, in forward order: the stem (everything before the tower's block
list: embeddings, patch/conv stem, pre-norm), one group per block of its main block list
(``layers`` / ``layer`` / ``blocks`` / ``resblocks``; timm EfficientNets' ``blocks.N`` are
stages), and the head (final norm, pooling head and projection).  ``unlocked_groups=N`` leaves
the last N groups trainable, counted from the head, like open_clip's
``lock_image_unlocked_groups`` (open_clip keeps the final norm with the last block and the
projection alone; here they form one head group).  The groups come from parameter names, so
one rule covers every kind; tests/model/test_locking.py pins the partition of each.

Locked parameters get ``requires_grad=False`` (the optimizer and the gradient clip only see
trainable ones, optim.py / loop.py) and the locked modules stay in eval mode through every
``model.train()``: BatchNorm statistics are weights too, and a locked tower must come out of
training bit-identical (LiT's frozen image tower; open_clip's ``freeze_bn_stats``).
"""

from __future__ import annotations

import re

from torch import nn

# Parameters every tower shares (the loss's temperature and SigLIP bias): never locked.
SHARED = ("log_temperature", "temperature", "logit_scale", "logit_bias")
# Where each kind keeps its image tower (prefixes of parameter names); the text tower is the rest.
IMAGE_PREFIXES = {
    "ours": ("image_tower.", "image_proj."),
    "hf": ("model.vision_model.", "model.visual_projection."),
    "open_clip": ("model.visual.",),
}
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|blocks|resblocks)\.(\d+)(?:\.|$)")
_HEAD = re.compile(r"(?:^|\.)(?:post_layernorm|final_layer_norm|ln_final|ln_post|norm|fc_norm|head|"
                   r"conv_head|bn2|pooler|proj|image_proj|text_proj|text_projection|"
                   r"visual_projection)(?:\.|$)")


def _shared(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SHARED


def tower_params(model: nn.Module, kind: str, tower: str) -> list[str]:
    """Names of ``tower``'s ("image" or "text") parameters, in registration order."""
    prefixes = IMAGE_PREFIXES[kind]
    names = [n for n, _ in model.named_parameters() if not _shared(n)]
    if tower == "image":
        return [n for n in names if n.startswith(prefixes)]
    return [n for n in names if not n.startswith(prefixes)]


def groups(model: nn.Module, kind: str, tower: str) -> list[list[str]]:
    """``tower``'s parameter names as [stem, block 0, ..., block n-1, head], empty groups left out."""
    stem: list[str] = []
    head: list[str] = []
    blocks: dict[int, list[str]] = {}
    for name in tower_params(model, kind, tower):
        m = _BLOCK.search(name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(name)
        elif _HEAD.search(name):
            head.append(name)
        else:
            stem.append(name)
    return [g for g in [stem, *(blocks[i] for i in sorted(blocks)), head] if g]


def lock(model: nn.Module, kind: str, tower: str, unlocked_groups: int = 0) -> list[str]:
    """Freeze ``tower`` but its last ``unlocked_groups`` groups; returns the locked names."""
    if unlocked_groups < 0:
        raise ValueError("unlocked groups must be >= 0")
    gs = groups(model, kind, tower)
    if not gs:
        raise ValueError(f"model has no {tower} tower parameters to lock")
    locked = [n for g in gs[:max(0, len(gs) - unlocked_groups)] for n in g]
    params = dict(model.named_parameters())
    for n in locked:
        params[n].requires_grad_(False)
    _keep_eval(model)
    return locked


def _stay_eval(mod: nn.Module, args) -> None:
    if mod.training:
        mod.eval()
    return None  # a pre-hook's non-None return would replace the forward's arguments


def _hold_eval(mod: nn.Module) -> None:
    """Hook ``mod`` once with :func:`_stay_eval`."""
    if not getattr(mod, "_align_locked", False):
        mod._align_locked = True
        mod.register_forward_pre_hook(_stay_eval)


def _keep_eval(model: nn.Module) -> None:
    """Keep every module whose parameters are all frozen in eval mode, whatever ``train()`` says
    later: a forward pre-hook re-applies ``eval()`` (so BatchNorm running stats and dropout of a
    locked part never change).  Every such module is hooked, not only the outermost: a frozen
    ``ModuleList`` is never called itself, its blocks are."""
    for name, mod in model.named_modules():
        ps = list(mod.parameters())
        if name and ps and not any(p.requires_grad for p in ps):
            _hold_eval(mod)


def freeze_bn_stats(model: nn.Module, kind: str) -> int:
    """Keep the image tower's BatchNorm layers in eval mode through training (the pre-hook of
    :func:`_hold_eval`): they normalise with the running statistics they were loaded with and
    never update them, while their scale and shift still train.  Why: statistics re-estimated
    on one corpus's images fit that corpus; a pretrained tower's (ImageNet's) are broader.
    Returns how many layers it holds."""
    prefixes = IMAGE_PREFIXES[kind]
    held = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and f"{name}.".startswith(prefixes):
            held += 1
            _hold_eval(mod)
    return held


def apply_locks(model: nn.Module, kind: str, cfg) -> dict[str, int]:
    """``cfg``'s ``lock_image`` / ``lock_text`` and ``freeze_bn_stats`` (TrainConfig) on
    ``model``; returns counts of locked and trainable parameter tensors (logged by the training
    loop)."""
    if cfg.lock_image:
        lock(model, kind, "image", cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        lock(model, kind, "text", cfg.lock_text_unlocked_groups)
    held = freeze_bn_stats(model, kind) if cfg.freeze_bn_stats else 0
    ps = list(model.parameters())
    return {"locked": sum(not p.requires_grad for p in ps), "trainable": sum(p.requires_grad for p in ps),
            "bn_frozen": held}
