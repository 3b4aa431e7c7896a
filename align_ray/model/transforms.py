"""Image decoding and the train/eval pixel transforms (PIL + NumPy; no torch needed).

``decode_rgb`` is the single entry point for untrusted bytes: it reads the header first and rejects
decompression bombs before decoding (without touching Pillow's global ``MAX_IMAGE_PIXELS``), and
returns an RGB image whatever the source mode (transparent images are composited on white).
Transforms return float32 ``[3, H, W]`` arrays normalised with the image tower's mean/std.

Evaluation has one definition, shared by training's validation data and by eval/index/serve
(:class:`~align_ray.model.pretrained.Embedder`): :func:`eval_pixels` (resize + centre crop to
uint8, which is what the training data workers ship to the trainers) and then :func:`normalize`
with :func:`image_norm`'s mean/std (what the trainer does on its device).  So a model sees the
same tensor for the same image bytes whether it is validated during training or served.
"""

from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 1 << 26  # 67 M pixels (~200 MB as RGB); below Pillow's own bomb limit

Transform = Callable[[Image.Image], np.ndarray]
Norm = tuple[tuple[float, float, float], tuple[float, float, float]]


def _pretrained_norm(image_model: str) -> Norm | None:
    """timm's ``pretrained_cfg`` mean/std for ``image_model``, if it has an RGB pair."""
    import timm  # lazily: decoding and the transforms themselves need no torch

    try:
        pc = timm.models.get_pretrained_cfg(image_model)
    except Exception:  # noqa: BLE001 - unknown/custom names have no pretrained_cfg
        return None
    mean, std = getattr(pc, "mean", None), getattr(pc, "std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return None  # grayscale towers (1 value) or a half-filled cfg: never mix with ImageNet's
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def image_norm(cfg) -> Norm:
    """``(mean, std)`` of the image tower described by ``cfg`` (a ``ModelConfig``), without
    building it: ``cfg.image_mean`` / ``cfg.image_std`` where set, else timm's ``pretrained_cfg``
    pair for ``cfg.image_model`` when it is RGB, else ImageNet's.  The towers always take RGB, so
    an explicit mean/std must have three values."""
    mean, std = cfg.image_mean, cfg.image_std
    if mean is None or std is None:
        pmean, pstd = _pretrained_norm(cfg.image_model) or (MEAN, STD)
        mean = pmean if mean is None else mean
        std = pstd if std is None else std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean/image_std need 3 values (RGB), got {mean} / {std}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


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


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop ``size`` x ``size`` (RGB)."""
    img = _to_rgb(img)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def eval_transform(size: int, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Transform:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop ``size`` x ``size``."""

    def apply(img: Image.Image) -> np.ndarray:
        return to_array(_resize_crop(img, size), mean, std)

    return apply


def eval_pixels(img: Image.Image, size: int) -> np.ndarray:
    """The evaluation view of an image as uint8 ``[3, size, size]``: what training's data workers
    produce for validation rows, and what :func:`normalize` turns into the model's input."""
    return np.ascontiguousarray(np.asarray(_resize_crop(img, size), dtype=np.uint8).transpose(2, 0, 1))


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[..., 3, H, W]`` -> float32 normalised, with the same float32 arithmetic as the
    trainer's ``Normalize`` (``(p - 255 mean) / (255 std)``), so both give the same numbers."""
    m = np.asarray(mean, np.float32).reshape(3, 1, 1) * np.float32(255.0)
    s = np.asarray(std, np.float32).reshape(3, 1, 1) * np.float32(255.0)
    return (pixels.astype(np.float32) - m) / s


def train_transform(
    size: int,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.5,
    seed: int | None = None,
    jitter: float = 0.0,
    gray: float = 0.0,
    style: float = 0.0,
) -> Transform:
    """Random resized crop (area ``scale``, aspect ``ratio``) + horizontal flip, as in ALIGN, and
    optionally colour jitter of strength ``jitter`` and grayscale with probability ``gray``
    (:func:`recolour`), and a drawing-style change with probability ``style`` (:func:`restyle`).
    With these at 0 no random number is drawn for them, so the crops and flips of a seed are the
    same as without the options."""
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
        if style > 0 and rng.random() < style:
            out = restyle(out, rng)
        if jitter > 0 or gray > 0:
            out = recolour(out, rng, jitter, gray)
        return to_array(out, mean, std)

    return apply


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def recolour(img: Image.Image, rng: np.random.Generator, jitter: float, gray: float) -> Image.Image:
    """SimCLR-style colour augmentation: brightness, contrast and saturation factors drawn from
    [1 - jitter, 1 + jitter] in a random order, a hue rotation of up to ``jitter / 8`` of the
    circle; then grayscale with probability ``gray``.  Why: an image tower trained on one
    artist's palette keys on colours; other artists draw the same concept in other colours.
    The hue rotation is kept small (SimCLR's is twice as large) because captions often name
    colours ("orange square", "green heart"): a rotated hue would contradict them, as a flip
    contradicts "left"/"right".  Not torchvision's ColorJitter: it draws from torch's global
    RNG, and a training row's augmentation must come from its own seed (``rng``) so a resumed
    run replays the same pixels."""
    if jitter > 0:
        for i in rng.permutation(len(_ENHANCERS)):
            img = _ENHANCERS[i](img).enhance(rng.uniform(max(0.0, 1 - jitter), 1 + jitter))
        shift = int(round(rng.uniform(-jitter / 8, jitter / 8) * 256))
        if shift:
            hsv = np.asarray(img.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
    if gray > 0 and rng.random() < gray:
        img = img.convert("L").convert("RGB")
    return img


def restyle(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Redraw ``img`` as another illustrator might: each of flat colours (a palette of 4-16),
    dark outlines along colour edges, and a smaller drawing on a white margin (70-95 % of the
    side, placed at random), each with probability 1/2, at least one.  Why: icons and clip art
    of one concept differ between artists mostly in shading, outlines and margins, and an
    image tower trained on one artist's drawings keys on those.  It assumes light backgrounds,
    which is what such corpora have; for photographs leave it off."""
    picks = rng.random(3) < 0.5
    if not picks.any():
        picks[rng.integers(3)] = True
    flat, outline, shrink = picks
    if flat:
        img = img.quantize(int(rng.integers(4, 17)), method=Image.Quantize.MEDIANCUT).convert("RGB")
    if outline:
        # edges between the colour regions of an 8-colour version (so shading gradients draw no
        # lines), about 1/32 of the side wide, inside the frame (FIND_EDGES marks the border)
        regions = img.quantize(8, method=Image.Quantize.MEDIANCUT).convert("L")
        mask = regions.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 0 else 0)
        w, h = img.size
        for _ in range(max(0, round(min(w, h) / 64) - 1)):
            mask = mask.filter(ImageFilter.MaxFilter(3))
        frame = Image.new("L", (w, h), 0)
        frame.paste(255, (1, 1, w - 1, h - 1))
        mask = Image.composite(mask, frame, frame)
        img = Image.composite(Image.new("RGB", img.size, (24, 24, 24)), img, mask)
    if shrink:
        w, h = img.size
        f = rng.uniform(0.7, 0.95)
        small = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BICUBIC)
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        canvas.paste(small, (int(rng.integers(0, w - small.size[0] + 1)),
                             int(rng.integers(0, h - small.size[1] + 1))))
        img = canvas
    return img
