"""Image decoding and the train/eval pixel transforms (PIL + NumPy; no torch needed).

``decode_rgb`` is the single entry point for untrusted bytes: it reads the header first and rejects
decompression bombs before decoding (without touching Pillow's global ``MAX_IMAGE_PIXELS``), and
returns an RGB image whatever the source mode (transparent images are composited on white).
Transforms return float32 ``[3, H, W]`` arrays normalised with the image tower's mean/std.
"""

from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 1 << 26  # 67 M pixels (~200 MB as RGB); below Pillow's own bomb limit

Transform = Callable[[Image.Image], np.ndarray]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        img = Image.fromarray((arr * (255.0 / max(hi, 1.0))).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        img = Image.fromarray(((arr - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image; ``ValueError`` for non-images and bombs.

    ``draft``: for JPEG, let libjpeg decode at a reduced scale no smaller than ``draft`` px per side.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ValueError("empty or non-bytes image data")
    try:
        img = Image.open(io.BytesIO(bytes(data)))  # lazy: reads the header only
        w, h = img.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise ValueError(f"image of {w}x{h} pixels exceeds max_pixels={max_pixels}")
        if draft and img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
        return _to_rgb(img)
    except ValueError:
        raise
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), DecompressionBomb*, ...
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e


def to_array(img: Image.Image, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> np.ndarray:
    """RGB PIL image -> normalised float32 [3, H, W]."""
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def eval_transform(size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Transform:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop ``size`` x ``size``."""

    def apply(img: Image.Image) -> np.ndarray:
        img = _to_rgb(img)
        w, h = img.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return to_array(img, mean, std)

    return apply


def train_transform(
    size: int,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
    seed: int | None = None,
) -> Transform:
    """Random resized crop (area ``scale``, aspect ``ratio``) + horizontal flip, as in ALIGN."""
    rng = np.random.default_rng(seed)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def crop_box(w: int, h: int) -> tuple[float, float, float, float]:
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*scale)
            ar = math.exp(rng.uniform(*log_ratio))
            cw, ch = math.sqrt(target * ar), math.sqrt(target / ar)
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                return left, top, left + cw, top + ch
        s = min(w, h)  # fallback: centre square
        return (w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2

    def apply(img: Image.Image) -> np.ndarray:
        img = _to_rgb(img)
        out = img.resize((size, size), Image.BICUBIC, box=crop_box(*img.size))
        if rng.random() < flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_array(out, mean, std)

    return apply
