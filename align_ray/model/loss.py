"""Contrastive losses with gathered negatives ("local loss + gather with grad", as open_clip).

Each worker holds a local batch of B pairs. ``all_gather_with_grad`` concatenates the embeddings of
all W workers (W*B rows) and, in backward, sends every worker the SUM over workers of the gradient
w.r.t. its own rows, so the gradient from a negative used on another rank flows back to its owner.
Each worker then computes a B x (W*B) logit matrix (its local rows against every column; labels are
``arange(B) + rank*B``), so memory is O(B * W*B) per worker, never (W*B)^2.

Gradient scaling (no extra factor needed with DDP): the loss on rank r is a mean over its B rows,
L_r, and the single-process loss on the concatenated W*B batch is L = (1/W) sum_r L_r. After the local
backward, rank r's parameter gradient is the sum over ALL ranks' losses of the contributions that
pass through rank r's embeddings (the gather's backward sums them); summed over r that is
d(sum_r L_r)/dtheta = W dL/dtheta, and DDP's all-reduce *averages* (divides by W), giving exactly
dL/dtheta. Report the mean of L_r over ranks as the loss. (With a manual SUM all-reduce instead of
DDP, divide by W.) ``tests/model/test_loss.py`` checks this numerically in float64 with W=2 on gloo.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from align_ray.model.config import ModelConfig
from align_ray.model.dual_encoder import unwrap


def _dist_on(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's equally-shaped tensor along dim 0.
    Backward: sum the incoming gradients over ranks and return this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # One code path for every backend (gloo has no reduce_scatter): sum over ranks, keep our
        # slice. The tensor is only (W*B) x D, negligible next to the parameter all-reduce.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (identity when not distributed or world size 1).

    Every rank must pass the same shape (train with ``drop_last``)."""
    if not _dist_on(group):
        return x
    return _AllGatherWithGrad.apply(x, group)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (image->text and text->image) with label smoothing (ALIGN: 0.1) over
    gathered negatives. ``loss(img, txt, temperature) -> scalar`` (this rank's mean over B rows)."""

    def __init__(self, label_smoothing: float = 0.1, group=None) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.group = group

    def logits(self, img: torch.Tensor, txt: torch.Tensor, temperature: torch.Tensor):
        rank, _ = rank_and_world(self.group)
        all_img = all_gather_with_grad(img, self.group)
        all_txt = all_gather_with_grad(txt, self.group)
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        return img @ all_txt.T / temperature, txt @ all_img.T / temperature, labels

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        i2t, t2i, labels = self.logits(img, txt, temperature)
        ls = self.label_smoothing
        return 0.5 * (
            F.cross_entropy(i2t, labels, label_smoothing=ls) + F.cross_entropy(t2i, labels, label_smoothing=ls)
        )


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): ``-sum log sigmoid(z_ij * (x_i.y_j / temperature + bias)) / B``
    over this rank's B images against all W*B gathered texts (z = +1 for the pair, -1 otherwise).

    Where the learnable bias lives: by default in the MODEL (``DualEncoder.logit_bias``, created when
    ``cfg.loss == "siglip"``; pass it as ``bias=`` or build with :func:`build_loss`), so DDP syncs its
    gradient, the optimiser sees it and ``save_pretrained`` stores it. Without one, the loss module
    owns ``self.logit_bias`` (then add ``loss.parameters()`` to the optimiser and sync it yourself).
    """

    def __init__(self, bias: torch.Tensor | None = None, bias_init: float = -10.0, group=None) -> None:
        super().__init__()
        self.group = group
        if bias is None:
            self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))
            self._external: list[torch.Tensor] = []
        else:
            self._external = [bias]  # a reference, not registered here (it belongs to the model)

    @property
    def bias(self) -> torch.Tensor:
        return self._external[0] if self._external else self.logit_bias

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temperature: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rank, _ = rank_and_world(self.group)
        b = self.bias if bias is None else bias
        all_txt = all_gather_with_grad(txt, self.group)
        logits = img @ all_txt.T / temperature + b
        n = img.shape[0]
        signs = -torch.ones_like(logits)
        idx = torch.arange(n, device=img.device)
        signs[idx, idx + rank * n] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


def build_loss(cfg: ModelConfig, model: nn.Module | None = None, group=None) -> nn.Module:
    """The loss ``cfg.loss`` names; for SigLIP it uses the model's ``logit_bias`` (DDP-unwrapped)."""
    if cfg.loss == "clip":
        return ClipLoss(cfg.label_smoothing, group=group)
    bias = getattr(unwrap(model), "logit_bias", None) if model is not None else None
    return SigLipLoss(bias=bias, bias_init=cfg.siglip_bias_init, group=group)
