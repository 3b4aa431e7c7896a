"""Encoded images per sample id, cheap to serve: a byte-bounded LRU cache or a pinned pool.

Rendering a photo-like picture costs ~0.1 s, far more than sending it, so the server keeps the
encoded bytes.  For benchmarks ``pool_size=P`` pre-renders P pictures once and serves id ``i``
as picture ``i % P``: unlimited distinct URLs at memory speed.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from align_ray.web.synth import image_size, jpeg_bytes, render, sample_spec

DEFAULT_QUALITY = 90


class ImageStore:
    """Encoded JPEGs per sample id: a pinned pool (``pool_size``) or a byte-bounded LRU cache."""

    def __init__(self, seed: int, photo_like: bool, size_range: tuple[int, int],
                 pool_size: int | None, cache_bytes: int = 256 << 20) -> None:
        self.seed, self.photo_like, self.size_range, self.pool_size = seed, photo_like, size_range, pool_size
        self._cache: OrderedDict[tuple[int, int, int, int], bytes] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cache_bytes
        self._pool: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def key(self, idx: int) -> int:
        """The sample whose picture ``idx`` shows (``idx % pool_size`` with a pool)."""
        return idx % self.pool_size if self.pool_size else idx

    def spec(self, idx: int) -> dict[str, Any]:
        """Attributes and caption of the picture served for ``idx``."""
        return sample_spec(self.key(idx), self.seed)

    def size(self, idx: int) -> tuple[int, int]:
        """Native ``(width, height)`` of the picture served for ``idx``."""
        return image_size(self.key(idx), self.seed, self.size_range)

    def warm_pool(self) -> None:
        """Render and pin the whole pool up front (threaded: PIL releases the GIL while encoding)."""
        if not self.pool_size:
            return
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as executor:
            self._pool = dict(zip(range(self.pool_size), executor.map(self._render, range(self.pool_size))))

    def jpeg(self, idx: int, width: int | None = None, height: int | None = None,
             quality: int = DEFAULT_QUALITY) -> bytes:
        """The JPEG for ``idx``; a requested size or quality re-encodes the native picture."""
        key = self.key(idx)
        native_w, native_h = self.size(idx)
        if width and not height:
            height = max(1, round(native_h * width / native_w))
        elif height and not width:
            width = max(1, round(native_w * height / native_h))
        width, height = width or native_w, height or native_h
        if (width, height, quality) == (native_w, native_h, DEFAULT_QUALITY):
            return self._native(key)
        cache_key = (key, width, height, quality)
        cached = self._cached(cache_key)
        if cached is None:
            picture = Image.open(io.BytesIO(self._native(key)))
            cached = jpeg_bytes(picture.resize((width, height), Image.Resampling.LANCZOS), quality)
            self._remember(cache_key, cached)
        return cached

    def _native(self, key: int) -> bytes:
        """The picture of sample ``key`` at its native size and default quality."""
        if key in self._pool:
            return self._pool[key]
        cache_key = (key, 0, 0, DEFAULT_QUALITY)
        cached = self._cached(cache_key)
        if cached is None:
            cached = self._render(key)
            self._remember(cache_key, cached)
        return cached

    def _render(self, key: int) -> bytes:
        """Render and encode sample ``key`` (pure; may run concurrently)."""
        width, height = image_size(key, self.seed, self.size_range)
        return jpeg_bytes(render(sample_spec(key, self.seed), width, height, photo_like=self.photo_like))

    def _cached(self, cache_key: tuple[int, int, int, int]) -> bytes | None:
        """LRU lookup, refreshing the entry's recency."""
        with self._lock:
            if cache_key in self._cache:
                self._cache.move_to_end(cache_key)
                return self._cache[cache_key]
            return None

    def _remember(self, cache_key: tuple[int, int, int, int], data: bytes) -> None:
        """LRU insert, evicting the oldest entries beyond the byte budget."""
        with self._lock:
            if cache_key not in self._cache:
                self._cache[cache_key] = data
                self._cache_bytes += len(data)
            while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1])
