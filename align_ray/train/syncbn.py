"""SyncBatchNorm that also runs on CPU (gloo), so 2 workers x B normalise like 1 x 2B everywhere.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors (its kernel is CUDA-only), and without it each
worker's BatchNorm normalises over its own B rows: a different model from the single-process one
with batch W x B (BENCHMARKS.md "Training quality" measures what that costs).  This module is a
BatchNorm whose train-mode forward, with a process group of more than one rank, on a
non-accelerator device, all-reduces the batch moments through a differentiable all-reduce (its
backward all-reduces the gradient), so the backward is the global BatchNorm's backward as well.

One collective per layer and pass: ``[sum x, sum x^2, count]`` per channel in float64 (float64 so
that E[x^2] - E[x]^2 loses nothing that matters at these sizes).  The layers use their own gloo
group, not the default one that DDP's gradient buckets use, so that a layer's all-reduce never
waits behind a bucket.  In eval mode and with one rank it is plain BatchNorm.  It is not an
``nn.SyncBatchNorm`` subclass (DDP refuses those on CPU); on GPUs the loop uses timm's converter
to torch's own.  timm's fused BatchNorm+activation layers keep their ``drop``/``act`` (as timm's
converter does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

_ACCEL = ("cuda", "hpu", "xpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group, differentiable: d(sum)/d(each rank's input) sums every rank's gradient
    (torch.distributed.nn.functional's is deprecated, the functional collectives are private)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every rank's rows on CPU (see the module docstring)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._cpu_forward(x) if self._cpu_sync(x) else super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x

    def _group(self):
        return self.process_group or dist.group.WORLD

    def _cpu_sync(self, x: torch.Tensor) -> bool:
        return (self.training and x.device.type not in _ACCEL and dist.is_initialized()
                and dist.get_world_size(self._group()) > 1)

    def _factor(self) -> float:
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:                         # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self._factor()
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xd = x.double()
        count = x.new_full((1,), x.numel() // c, dtype=torch.float64)
        stats = _AllReduceSum.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]),
                                    self._group())
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)    # biased, as BN normalises
        if self.training and self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype),
                                                        alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype),
                                                       alpha=factor)
        shape = (1, c) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert(module: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm (timm's BatchNormAct2d included) -> :class:`SyncBatchNorm`, sharing the
    original's parameters and buffers, so the state_dict keys (and a saved model) are unchanged."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        for extra in ("act", "drop"):                 # timm's fused norm + activation
            if hasattr(module, extra):
                setattr(out, extra, getattr(module, extra))
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert(child, process_group))
    return out


def new_group():
    """A gloo group of every rank for the BatchNorm all-reduces (call on every rank), or None
    (the default group) outside a process group or where no gloo sub-group can be made."""
    if not dist.is_initialized():
        return None
    try:
        return dist.new_group(backend="gloo")
    except (RuntimeError, ValueError) as e:   # no gloo sub-groups here: share the default one
        import logging

        logging.getLogger(__name__).warning("sync_bn: no gloo sub-group (%s); BatchNorm "
                                            "all-reduces share the default process group", e)
        return None
