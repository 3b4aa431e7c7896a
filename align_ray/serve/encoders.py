"""``ImageEncoder`` and ``TextEncoder``: two Serve deployments, each scaled on its own.

Each replica holds one :class:`~align_ray.model.Embedder`.  Requests are grouped by
``@serve.batch`` (dynamic batching: one forward pass for everything that arrived within
``batch_wait_timeout_s``, up to ``max_batch_size`` requests); the batch parameters come in through
``user_config`` so a Serve config file can retune them live (``reconfigure``).

Bad input never raises across the handle: ``embed`` returns ``{"error": message}`` for a request
whose item cannot be decoded, so one bad image cannot fail the other requests of its batch, and
the Router answers it with a 4xx.  ``check_health`` runs a tiny canary through the model when the
replica has been idle, and fails after repeated unexpected errors, so Serve replaces a replica
that can no longer embed.  Shutdown is graceful: Serve drains in-flight requests
(``graceful_shutdown_*``) and ``__del__`` frees the model.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger("ray.serve")

_DEPLOYMENT_DEFAULTS = dict(
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=20,
    max_ongoing_requests=64,
)
_CANARY_AFTER_IDLE_S = 30.0
_MAX_CONSECUTIVE_FAILURES = 3


class _EncoderBase:
    kind = "?"

    def __init__(self, model_dir: str, device: str = "cpu", max_pixels: int = 25_000_000):
        from align_ray.model.pretrained import load_embedder

        self.embedder = load_embedder(model_dir, device=device)
        self.max_pixels = max_pixels
        self.forward_batch_size = 64
        self.batches = 0
        self.items = 0
        self.requests = 0
        self.failures = 0
        self.last_ok = time.monotonic()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``max_batch_size``, ``batch_wait_timeout_s``, ``forward_batch_size``,
        ``gil_switch_interval_s`` (live; see :class:`~align_ray.serve.config.EncoderConfig`)."""
        if "max_batch_size" in user_config:
            self._batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "forward_batch_size" in user_config:
            self.forward_batch_size = max(1, int(user_config["forward_batch_size"]))
        if "gil_switch_interval_s" in user_config:
            sys.setswitchinterval(float(user_config["gil_switch_interval_s"]))

    def info(self) -> dict[str, Any]:
        temperature = getattr(self.embedder.model, "temperature", None)
        return {"kind": self.kind, "dim": self.embedder.dim, "image_size": self.embedder.image_size,
                "temperature": float(temperature) if temperature is not None else None,
                "batches": self.batches, "items": self.items, "requests": self.requests,
                "max_batch_size": self._batched._get_max_batch_size(),
                "batch_wait_timeout_s": self._batched._get_batch_wait_timeout_s(),
                "gil_switch_interval_s": sys.getswitchinterval(),
                "device": str(self.embedder.device), "pid": os.getpid()}

    def ping(self) -> str:
        return "ok"

    def _run_batch(self, fn, parts: list) -> list:
        """Concatenate the requests' items, run ``fn`` once, split the result back.

        Runs ON the replica's event loop, deliberately: Serve forms the next batch as soon as
        this one starts (it does not wait for it to finish), so a forward pass moved to a thread
        leaves the loop free to cut the queue into many tiny batches (measured: mean batch 3 at
        32 in flight).  Blocking here lets requests pile up, and the next batch takes them all.
        """
        sizes = [len(p) for p in parts]
        flat = np.concatenate(parts) if self.kind == "image" else [t for p in parts for t in p]
        try:
            emb = fn(flat, self.forward_batch_size)
        except Exception:
            self.failures += 1
            raise
        self.failures = 0
        self.last_ok = time.monotonic()
        self.batches += 1
        self.items += len(flat)
        self.requests += len(parts)
        return np.split(emb, np.cumsum(sizes)[:-1])

    async def check_health(self) -> None:
        if self.failures >= _MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{self.kind} encoder: {self.failures} consecutive batch failures")
        if time.monotonic() - self.last_ok > _CANARY_AFTER_IDLE_S:
            await asyncio.to_thread(self._canary)
            self.last_ok = time.monotonic()

    def __del__(self) -> None:
        self.embedder = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


@serve.deployment(name="ImageEncoder", **_DEPLOYMENT_DEFAULTS)
class ImageEncoder(_EncoderBase):
    kind = "image"

    def _preprocess(self, images: list[bytes]) -> np.ndarray | str:
        from align_ray.model.transforms import decode_rgb

        arrs = []
        for j, data in enumerate(images):
            try:
                img = decode_rgb(data, max_pixels=self.max_pixels, draft=self.embedder.decode_draft)
                arrs.append(self.embedder.transform(img))
            except ValueError as e:
                return f"images[{j}]: {e}"
        return np.stack(arrs)

    async def embed(self, images: list[bytes]) -> np.ndarray | dict[str, str]:
        """Image bytes -> [N, D] unit vectors, or ``{"error": ...}`` naming the bad item."""
        if not images:
            return np.zeros((0, self.embedder.dim), np.float32)
        pixels = await asyncio.to_thread(self._preprocess, images)
        if isinstance(pixels, str):
            return {"error": pixels}
        return await self._batched(pixels)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, pixel_sets: list[np.ndarray]) -> list[np.ndarray]:
        return self._run_batch(self.embedder.embed_pixels, pixel_sets)

    def _canary(self) -> None:
        from PIL import Image

        size = self.embedder.image_size   # the model's own input layout (SigLIP 2's is packed)
        self.embedder.embed_pixels(self.embedder.transform(Image.new("RGB", (size, size)))[None])


@serve.deployment(name="TextEncoder", **_DEPLOYMENT_DEFAULTS)
class TextEncoder(_EncoderBase):
    kind = "text"

    async def embed(self, texts: list[str]) -> np.ndarray | dict[str, str]:
        """Texts -> [N, D] unit vectors."""
        if not texts:
            return np.zeros((0, self.embedder.dim), np.float32)
        if not all(isinstance(t, str) for t in texts):
            return {"error": "texts must be strings"}
        return await self._batched(list(texts))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, text_sets: list[list[str]]) -> list[np.ndarray]:
        return self._run_batch(self.embedder.embed_texts, text_sets)

    def _canary(self) -> None:
        self.embedder.embed_texts(["health check"])
