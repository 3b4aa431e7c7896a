"""Losses: the W-workers == one-process exactness test (float64, W=2, gloo, DDP) and unit checks."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from align_ray.model import ClipLoss, DualEncoder, SigLipLoss, all_gather_with_grad, build_loss
from tests.model.helpers import tiny_cfg

W, B, VOCAB, SEQ = 2, 4, 120, 10
NO_DROPOUT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _cfg(loss: str):
    return tiny_cfg(loss=loss, embed_dim=16, text_config=NO_DROPOUT, siglip_bias_init=-2.0)


def _model(loss: str, state=None) -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder(_cfg(loss), VOCAB).double()
    if state is not None:
        model.load_state_dict(state)
    # eval(): BatchNorm uses running stats (batch statistics would differ per rank by design);
    # gradients are still computed. Dropout is 0 anyway.
    return model.eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(W * B, 3, 64, 64, generator=g, dtype=torch.float64)
    ids = torch.randint(5, VOCAB, (W * B, SEQ), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(W * B, SEQ, dtype=torch.long)
    for i in range(W * B):  # varied lengths, padding included
        mask[i, 3 + i % (SEQ - 3):] = 0
    ids[mask == 0] = 0
    return pixels, ids, mask


class _GatherNoGradClipLoss(ClipLoss):
    """Negative control: gathered negatives WITHOUT gradient to their owner ranks (only the local
    slice keeps its graph, as open_clip's gather_with_grad=False). Must NOT match one process."""

    def logits(self, img, txt, temperature):
        rank, n = dist.get_rank(), img.shape[0]

        def gather(x):
            parts = [torch.empty_like(x) for _ in range(W)]
            dist.all_gather(parts, x.detach().contiguous())
            parts[rank] = x
            return torch.cat(parts)

        labels = torch.arange(n) + rank * n
        return img @ gather(txt).T / temperature, txt @ gather(img).T / temperature, labels


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        setup = torch.load(Path(tmp) / "setup.pt")
        pixels, ids, mask = setup["batch"]
        sl = slice(rank * B, (rank + 1) * B)
        results = {}
        for kind in ("clip", "siglip"):
            model = _model(kind, setup[kind])
            ddp = DDP(model)  # averages gradients over the W ranks
            loss_fn = build_loss(_cfg(kind), ddp)
            img, txt, temp = ddp(pixels[sl], ids[sl], mask[sl])
            loss = loss_fn(img, txt, temp)
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[kind] = {
                "loss": (mean_loss / W).item(),
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            }
        model = _model("clip", setup["clip"])
        ddp = DDP(model)
        _GatherNoGradClipLoss()(*ddp(pixels[sl], ids[sl], mask[sl])).backward()
        results["control"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_two_workers_equal_one_process_on_concatenated_batch(tmp_path):
    pixels, ids, mask = _batch()
    setup = {"batch": (pixels, ids, mask)}
    reference = {}
    for kind in ("clip", "siglip"):
        model = _model(kind)
        setup[kind] = {k: v.clone() for k, v in model.state_dict().items()}
        loss = build_loss(_cfg(kind), model)(*model(pixels, ids, mask))  # not distributed: W*B rows
        loss.backward()
        reference[kind] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.save(setup, tmp_path / "setup.pt")

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=W, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    for kind, (ref_loss, ref_grads) in reference.items():
        for res in ranks:
            assert abs(res[kind]["loss"] - ref_loss) / abs(ref_loss) < 1e-5, kind
            grads = res[kind]["grads"]
            assert grads.keys() == ref_grads.keys()
            total = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
            got = torch.cat([grads[n].flatten() for n in ref_grads])
            assert _rel(got, torch.cat([g.flatten() for g in ref_grads.values()])) < 1e-5, kind
            worst = max(_rel(grads[n], g) for n, g in ref_grads.items() if g.norm() > 1e-12 * total)
            print(f"{kind}: loss rel err {abs(res[kind]['loss'] - ref_loss) / abs(ref_loss):.1e}, "
                  f"worst per-parameter grad rel err {worst:.1e}")
            for n, g in ref_grads.items():
                if g.norm() > 1e-12 * total:
                    assert _rel(grads[n], g) < 1e-5, (kind, n, _rel(grads[n], g))
                else:  # mathematically zero (attention key biases: softmax is shift-invariant)
                    assert grads[n].norm() <= 1e-12 * total, (kind, n)
        # the checks are not vacuous: without gradient through the gather the result differs
        if kind == "clip":
            ctl = ranks[0]["control"]
            assert _rel(ctl["text_proj.weight"], ref_grads["text_proj.weight"]) > 1e-3
        # and towers, projections, temperature (and the SigLIP bias) all get gradients
        assert ref_grads["log_temperature"].abs() > 0
        assert ref_grads["text_proj.weight"].norm() > 0 and ref_grads["image_proj.weight"].norm() > 0
        assert ref_grads["text_tower.embeddings.word_embeddings.weight"].norm() > 0
        if kind == "siglip":
            assert ref_grads["logit_bias"].abs() > 0


def _emb(n: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x


def test_clip_label_smoothing_matches_manual_formula():
    img, txt = _emb(6)
    t = torch.tensor(0.1, dtype=torch.float64)
    eps = 0.1

    def smoothed_ce(logits):
        logp = logits.log_softmax(-1)
        k = logits.shape[1]
        target = torch.full_like(logp, eps / k) + torch.eye(k, dtype=logp.dtype) * (1 - eps)
        return -(target * logp).sum(-1).mean()

    manual = 0.5 * (smoothed_ce(img @ txt.T / t) + smoothed_ce(txt @ img.T / t))
    got = ClipLoss(label_smoothing=eps)(img, txt, t)
    assert torch.allclose(got, manual, rtol=1e-12)
    plain = ClipLoss(label_smoothing=0.0)(img, txt, t)
    assert not torch.allclose(got, plain)
    # without smoothing it is the textbook InfoNCE
    lab = torch.arange(6)
    assert torch.allclose(plain, 0.5 * (F.cross_entropy(img @ txt.T / t, lab) + F.cross_entropy(txt @ img.T / t, lab)))


def test_clip_loss_is_symmetric():
    img, txt = _emb(5, seed=3)
    t = torch.tensor(0.07, dtype=torch.float64)
    loss = ClipLoss()
    assert torch.allclose(loss(img, txt, t), loss(txt, img, t), rtol=1e-12)
    # perfectly aligned pairs score lower than random ones
    assert loss(img, img, t) < loss(img, txt, t)


def test_siglip_shape_grad_and_formula():
    img, txt = _emb(4, seed=5)
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss_fn = SigLipLoss(bias_init=-10.0)
    loss = loss_fn(img, txt, t)
    assert loss.ndim == 0 and torch.isfinite(loss)
    z = 2 * torch.eye(4, dtype=torch.float64) - 1
    manual = -F.logsigmoid(z * (img @ txt.T / t - 10.0)).sum() / 4
    assert torch.allclose(loss, manual, rtol=1e-12)
    loss.backward()
    for g in (img.grad, txt.grad, t.grad, loss_fn.logit_bias.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # an external (model-owned) bias is used instead and not registered in the loss module
    bias = torch.nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))
    ext = SigLipLoss(bias=bias)
    assert list(ext.parameters()) == []
    ext(img.detach(), txt.detach(), t.detach()).backward()
    assert bias.grad is not None and bias.grad != 0


def test_temperature_init_and_clamp():
    cfg = tiny_cfg(temperature_init=0.07, temperature_min=0.01)
    model = DualEncoder(cfg, 50)
    assert math.isclose(model.temperature.item(), 0.07, rel_tol=1e-6)
    with torch.no_grad():
        model.log_temperature.fill_(math.log(1e-4))  # an optimiser pushed it below the floor
    t = model.temperature
    assert math.isclose(t.item(), 0.01, rel_tol=1e-6)
    t.backward()
    assert model.log_temperature.grad.item() == 0.0  # clamped: no further push down
    assert math.isclose(DualEncoder(tiny_cfg(temperature_init=1.0), 50).temperature.item(), 1.0)
    with pytest.raises(ValueError):
        tiny_cfg(temperature_init=0.001, temperature_min=0.01)
