"""Starting or joining Ray the same way from the CLI, workflows and tests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import ray

_BOOTSTRAP = "provider:\n  type: local\n"


def sandbox_home(real_home: str) -> str:
    """A HOME holding ``ray_bootstrap_config.yaml`` with ``provider: {type: local}``, and a
    symlink to every entry of ``real_home`` (so ~/.aws, ~/.cache, ... still resolve).

    When Ray starts a local cluster, its dashboard looks for that file in HOME and, without it,
    sends HTTP probes to cloud metadata endpoints (169.254.169.254, metadata.google.internal)
    to guess the cloud for usage stats.  A local cluster is local, so we say so.
    """
    tag = hashlib.sha1(real_home.encode()).hexdigest()[:8]
    sandbox = Path(tempfile.gettempdir(), f"align-ray-home-{os.getuid()}-{tag}")
    sandbox.mkdir(exist_ok=True)
    (sandbox / "ray_bootstrap_config.yaml").write_text(_BOOTSTRAP)
    if real_home and Path(real_home).is_dir() and Path(real_home) != sandbox:
        for entry in Path(real_home).iterdir():
            link = sandbox / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    return str(sandbox)


def init(address: str | None = None, **kwargs) -> None:
    """Join/start Ray unless already initialised.

    ``address=None`` is plain ``ray.init()``: under ``ray job submit`` or with RAY_ADDRESS it
    joins that cluster, otherwise it starts a local one.  ``"local"`` always starts a fresh
    local cluster (never follows a stale ``ray_current_cluster`` file).  A local start gets
    :func:`sandbox_home` as the HOME of the Ray processes it launches.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs.setdefault("logging_level", "WARNING")
    real = os.environ.get("HOME", "")
    starts_local = address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    if starts_local and not Path(real or "/nonexistent", "ray_bootstrap_config.yaml").exists():
        os.environ["HOME"] = sandbox_home(real)
    try:
        ray.init(address=address, **kwargs)
    finally:
        if real:
            os.environ["HOME"] = real
