"""The learning-rate range test: the schedule and the reading of the curve.  A real range-test
run (Ray Train, outputs on S3, across a worker failure) is in tests/train/test_train.py."""

from __future__ import annotations

import math
import random

import pytest

from align_ray.train import lr_find
from align_ray.train.config import TrainConfig
from align_ray.train.optim import lr_factor


def test_range_test_schedule_is_geometric_without_warmup():
    f = [lr_factor(s, total=50, warmup=30, schedule="range_test", min_ratio=1e-4)
         for s in range(50)]
    assert f[0] == pytest.approx(1e-4) and f[-1] == pytest.approx(1.0)
    ratios = {round(b / a, 9) for a, b in zip(f, f[1:])}
    assert len(ratios) == 1 and ratios.pop() == pytest.approx(1e4 ** (1 / 49))


def test_range_test_config(tmp_path):
    cfg = TrainConfig(data=["x.parquet"], output="o", schedule="range_test", min_lr_ratio=1e-5)
    assert cfg.log_every == 1  # one loss per learning rate tried
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="min_lr_ratio"):
            TrainConfig(data=["x.parquet"], output="o", schedule="range_test", min_lr_ratio=bad)


def _curve(noise: float, steps: int = 100, seed: int = 0) -> list[dict]:
    """Flat at low lr, steepest fall at lr 1e-3, a minimum near 2e-2, then divergence."""
    rng = random.Random(seed)
    out = []
    for s in range(steps):
        lr = lr_factor(s, total=steps, warmup=0, schedule="range_test", min_ratio=1e-5)
        x = math.log10(lr)
        loss = 5 - 3 / (1 + math.exp(-3 * (x + 3))) + 8 * max(0.0, x + 1.5) ** 2
        out.append({"step": s + 1, "lr": lr, "loss": loss + rng.gauss(0, noise)})
    return out


@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_suggestion_is_the_steepest_descent_before_the_minimum(noise):
    res = lr_find.suggest(_curve(noise))
    assert 1e-3 / 1.5 < res["suggested_lr"] < 1e-3 * 1.5
    assert 1e-2 < res["min_loss_lr"] < 5e-2
    assert res["min_loss_lr_div10"] == pytest.approx(res["min_loss_lr"] / 10)
    assert res["diverged_at_lr"] is not None and res["diverged_at_lr"] > res["min_loss_lr"]


def test_unusable_curves_are_errors():
    rows = _curve(0.0)[:4] + [{"step": 5, "lr": 1e-3, "loss": float("nan")}]
    with pytest.raises(ValueError, match="usable steps"):
        lr_find.suggest(rows)
