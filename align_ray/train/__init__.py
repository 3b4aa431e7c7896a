"""Contrastive training of the ALIGN dual encoder on Ray Train, and its evaluation.

``run(cfg) -> dict`` (align_ray.train.run), ``TrainConfig`` (config), evaluation metrics
(evaluate: ``retrieval_metrics``, ``zero_shot_classify``).  Imports are lazy so that
``align_ray.train.evaluate`` stays light (NumPy only).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from align_ray.train.run import run

        return run
    if name == "TrainConfig":
        from align_ray.train.config import TrainConfig

        return TrainConfig
    raise AttributeError(name)
