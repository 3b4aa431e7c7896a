"""Helpers of the float64 exactness tests of the training step (test_gradcache.py,
test_equivalence.py): a tiny dual encoder, fixed batches, BatchNorm freezing, gloo workers.
Importable from ``mp.spawn``'d worker processes."""

from __future__ import annotations

import socket

import torch
from torch import nn

from align_ray.model import DualEncoder
from tests.model.helpers import tiny_cfg

VOCAB, SEQ = 120, 10


def text_config(dropout: float = 0.0) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32, hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout)


def model_cfg(loss: str = "clip", dropout: float = 0.0, drop_path: float = 0.0):
    return tiny_cfg(loss=loss, embed_dim=16, text_config=text_config(dropout),
                    siglip_bias_init=-2.0, drop_path_rate=drop_path)


def freeze_bn(model: nn.Module) -> nn.Module:
    """Train mode (dropout on), BatchNorm in eval mode: running statistics, no updates.  Batch
    statistics would differ with the batch split by design (per worker / per micro-batch)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def build(loss: str = "clip", state: dict | None = None, dropout: float = 0.0,
          drop_path: float = 0.0) -> DualEncoder:
    torch.manual_seed(0)
    model = DualEncoder(model_cfg(loss, dropout, drop_path), VOCAB).double()
    if state is not None:
        model.load_state_dict(state)
    return freeze_bn(model)


def batches(n: int, rows: int, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """``n`` batches of ``rows`` (pixels float64, input ids, attention mask with padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pixels = torch.randn(rows, 3, 64, 64, generator=g, dtype=torch.float64)
        ids = torch.randint(5, VOCAB, (rows, SEQ), generator=g)
        ids[:, 0] = 2  # [CLS]
        mask = torch.ones(rows, SEQ, dtype=torch.long)
        for i in range(rows):  # varied lengths, padding included
            mask[i, 3 + (i * 5 + len(out)) % (SEQ - 3):] = 0
        ids[mask == 0] = 0
        out.append((pixels, ids, mask))
    return out


def as_dict(b: tuple[torch.Tensor, ...]) -> dict:
    return {"pixels": b[0], "input_ids": b[1], "attention_mask": b[2]}


def rows(b: tuple[torch.Tensor, ...], sl: slice) -> tuple[torch.Tensor, ...]:
    return tuple(t[sl] for t in b)


def split(b: tuple[torch.Tensor, ...], k: int) -> list[dict]:
    """``b`` as ``k`` equal micro-batch dicts, in row order."""
    n = len(b[0]) // k
    return [as_dict(rows(b, slice(i * n, (i + 1) * n))) for i in range(k)]


def inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["pixels"], batch["input_ids"], batch["attention_mask"]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_grads_equal(got: dict, want: dict, tol: float) -> float:
    """Every parameter's gradient within ``tol`` (relative); gradients that are mathematically
    zero (attention key biases: softmax is shift-invariant) only need to be float noise.
    Returns the worst relative error."""
    assert got.keys() == want.keys()
    total = torch.cat([g.flatten() for g in want.values()]).norm()
    worst = 0.0
    for n, g in want.items():
        if g.norm() > 1e-12 * total:
            worst = max(worst, rel(got[n], g))
            assert rel(got[n], g) < tol, (n, rel(got[n], g))
        else:
            assert got[n].norm() <= 1e-12 * total, n
    return worst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
