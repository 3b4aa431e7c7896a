"""One optimizer step of the training loop: forward, gathered-negative loss, backward, clip, step.

``accum_steps == 1`` (the default) is the plain step: forward the batch with grad, loss over the
embeddings of all workers (model/loss.py), backward (DDP averages), clip, optimizer + schedule.

``accum_steps == K > 1`` is feature-cached gradient accumulation (GradCache, Gao et al. 2021):
the contrastive loss does not decompose over micro-batches (every row is a negative of every
other), so plain accumulation would shrink the negatives to one micro-batch.  Instead:

1. no-grad forward of each of the K micro-batches -> cached L2-normalised embeddings;
2. the loss over all K x B local rows against all W x K x B gathered rows (the same loss module
   with a local batch of K x B), and its gradient w.r.t. the cached embeddings, the temperature
   and the SigLIP bias only (``torch.autograd.grad``: no parameter gradient yet);
3. re-forward each micro-batch WITH grad and backprop the cached embedding gradients
   (``torch.autograd.backward(emb, grad)``); the last one also carries the temperature's and the
   bias's gradient, so DDP sees every parameter's gradient in the one synced backward;
4. clip once, one optimizer + schedule step.

Parameter gradients equal those of one K x B batch per worker (global batch B x W x K), up to
float rounding, while activations are held for one micro-batch only
(``tests/train/test_gradcache.py`` checks this in float64, 1 and 2 workers).  Caveats handled:

* Dropout / drop-path: each micro-batch's RNG state (CPU and the CUDA device) is saved before its
  no-grad forward and restored for its re-forward (inside ``torch.random.fork_rng``), so both
  passes draw the same masks and the RNG stream advances once per micro-batch, as with K plain
  forwards.
* BatchNorm: the no-grad pass runs in train mode (batch statistics, so its embeddings equal the
  re-forward's) and its running-stat update is undone (buffers saved and restored); the running
  stats are therefore updated once per micro-batch, by the re-forward, exactly as K plain steps
  of B would.  Running the no-grad pass in eval mode instead would normalise with the running
  stats and make the cached embeddings (hence the cached gradients) differ from the re-forward's.
  Train-mode BN normalises over one micro-batch (x workers with ``sync_bn``), not K x B: the one
  quantity GradCache cannot make batch-size independent.  The exactness test freezes BN.
* DDP: the no-grad pass uses the unwrapped module (no reducer, no buffer broadcast); all
  re-forwards but the last run under ``no_sync()``, so gradients are all-reduced once per step.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from align_ray.model import unwrap

# batch dict -> (pixels, input_ids, attention_mask) on the training device (normalised pixels)
Inputs = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class StepResult:
    loss: torch.Tensor        # this rank's loss (mean over its rows), detached
    grad_norm: torch.Tensor   # global gradient norm before clipping
    lr: float                 # the learning rate this step used


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) -> fp32 for the loss; fp32 is returned as is (so the K=1 step is
    today's ``x.float()`` bit for bit) and float64 stays float64 (the exactness tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                    if b is not None]
    return out


class _RngState:
    """The CPU (and, on GPU, the device's) RNG state, to replay one micro-batch's dropout."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """The global RNG set to this state inside, and put back as it was on exit."""
        with torch.random.fork_rng(devices=[self.device] if self.gpu is not None else []):
            torch.set_rng_state(self.cpu)
            if self.gpu is not None:
                torch.cuda.set_rng_state(self.gpu, self.device)
            yield


def _loss_bias(loss_fn: Any) -> torch.Tensor | None:
    """SigLIP's learnable bias (a model parameter the loss reads directly), else None."""
    bias = getattr(loss_fn, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.requires_grad else None


def forward_backward(ddp: nn.Module, loss_fn: Callable, micro: Sequence[dict], inputs: Inputs,
                     amp: Callable = nullcontext) -> torch.Tensor:
    """Gradients of the loss over all ``micro`` batches into the parameters' ``.grad``
    (call after ``zero_grad``); returns this rank's loss, detached."""
    if len(micro) == 1:  # the plain step
        with amp():
            img, txt, temp = ddp(*inputs(micro[0]))
        loss = loss_fn(_upcast(img), _upcast(txt), _upcast(temp))
        loss.backward()
        return loss.detach()
    return _grad_cache(ddp, loss_fn, micro, inputs, amp)


def _grad_cache(ddp: nn.Module, loss_fn: Callable, micro: Sequence[dict], inputs: Inputs,
                amp: Callable) -> torch.Tensor:
    core = unwrap(ddp)
    device = next(core.parameters()).device
    # 1. no-grad forward of every micro-batch; BN running stats restored (see the docstring)
    rngs, imgs, txts = [], [], []
    bn = _bn_buffers(core)
    for batch in micro:
        rngs.append(_RngState(device))
        saved = [b.clone() for b in bn]
        with torch.no_grad(), amp():
            img, txt, temp = core(*inputs(batch))
        for b, s in zip(bn, saved):
            b.copy_(s)
        imgs.append(_upcast(img))
        txts.append(_upcast(txt))
    # 2. the loss over all K x B local rows (gathered across workers inside loss_fn) and its
    #    gradient w.r.t. the cached embeddings, the temperature and the SigLIP bias
    img_all = torch.cat(imgs).requires_grad_()
    txt_all = torch.cat(txts).requires_grad_()
    temp_leaf = _upcast(temp).detach().requires_grad_()
    bias = _loss_bias(loss_fn)
    if bias is None:
        loss = loss_fn(img_all, txt_all, temp_leaf)
        g_img, g_txt, g_temp = torch.autograd.grad(loss, [img_all, txt_all, temp_leaf])
        g_bias = None
    else:
        bias_leaf = bias.detach().requires_grad_()
        loss = loss_fn(img_all, txt_all, temp_leaf, bias=bias_leaf)
        g_img, g_txt, g_temp, g_bias = torch.autograd.grad(
            loss, [img_all, txt_all, temp_leaf, bias_leaf])
    # 3. re-forward each micro-batch with grad, same dropout masks, and push the cached
    #    gradients through it; DDP all-reduces only in the last (synced) backward
    sizes = [len(x) for x in imgs]
    g_imgs, g_txts = g_img.split(sizes), g_txt.split(sizes)
    sync_off = getattr(ddp, "no_sync", nullcontext)
    for k, batch in enumerate(micro):
        last = k == len(micro) - 1
        with rngs[k].replay(), nullcontext() if last else sync_off():
            with amp():
                img, txt, temp = ddp(*inputs(batch))
            outs = [_upcast(img), _upcast(txt)]
            grads = [g_imgs[k], g_txts[k]]
            if last:  # the scalars once, in the synced backward: every parameter has a grad
                outs.append(_upcast(temp))
                grads.append(g_temp)
                if bias is not None:
                    outs.append(bias.view_as(bias))
                    grads.append(g_bias)
            # a locked tower (lock_image / lock_text) gives an embedding without a graph
            keep = [i for i, o in enumerate(outs) if o.requires_grad]
            torch.autograd.backward([outs[i] for i in keep], [grads[i] for i in keep])
    return loss.detach()


def take(batches: Iterator[dict], k: int) -> list[dict] | None:
    """The next ``k`` batches of ``batches`` (one step's micro-batches), or None when it ends
    first (a partial step is dropped, like ``drop_last`` drops a partial batch)."""
    out = list(itertools.islice(batches, k))
    return out if len(out) == k else None


def clip_and_step(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                  scheduler, grad_clip: float) -> tuple[torch.Tensor, float]:
    """Clip the global norm (``grad_clip`` > 0), optimizer and schedule step; returns the norm
    before clipping (max_norm=inf measures without clipping, so it is logged with clipping off
    too) and the learning rate the update used."""
    grad_norm = torch.nn.utils.clip_grad_norm_(
        params, grad_clip if grad_clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return grad_norm, lr


def train_step(ddp: nn.Module, loss_fn: Callable, micro: Sequence[dict], inputs: Inputs,
               optimizer: torch.optim.Optimizer, scheduler, params: Sequence[torch.Tensor],
               grad_clip: float, amp: Callable = nullcontext) -> StepResult:
    """One optimizer step over ``micro`` (``accum_steps`` batches of ``batch_size``: one is the
    plain step, more is GradCache over all of them)."""
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(ddp, loss_fn, micro, inputs, amp)
    grad_norm, lr = clip_and_step(params, optimizer, scheduler, grad_clip)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr)
