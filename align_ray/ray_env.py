"""Starting or joining Ray the same way from the CLI, workflows and tests."""

from __future__ import annotations

import os

import ray


def init(address: str | None = None, **kwargs) -> None:
    """Join/start Ray unless already initialised.

    ``address=None`` is plain ``ray.init()``: under ``ray job submit`` or with RAY_ADDRESS it
    joins that cluster, otherwise it starts a local one.  ``"local"`` always starts a fresh
    local cluster (never follows a stale ``ray_current_cluster`` file).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs.setdefault("logging_level", "WARNING")
    ray.init(address=address, **kwargs)
