"""Small helpers shared by the model tests (importable from spawned worker processes)."""

from __future__ import annotations

from align_ray.model import ModelConfig


def tiny_cfg(**overrides) -> ModelConfig:
    """``ModelConfig.tiny`` with timm's ``test_efficientnet`` (0.1 M params) for speed."""
    base = dict(image_model="test_efficientnet", vocab_size=500)
    base.update(overrides)
    return ModelConfig.tiny(**base)
