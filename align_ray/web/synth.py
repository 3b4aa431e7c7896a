"""Deterministic, learnable image-caption pairs: coloured shapes on coloured backgrounds.

Every sample is a pure function of ``(idx, seed)``: which shape, its colour, how many, where
they sit and the background colour, plus a caption rendered from one of several English
templates.  The attributes are few and visually unambiguous, so a small dual encoder can
learn the caption <-> image mapping; that makes the synthetic web useful end to end (download,
train, retrieve), not only as a transport test.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: dict[str, str] = {  # singular -> plural
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "hexagon": "hexagons",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
POSITIONS: dict[str, str] = {  # position -> English phrase
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COUNT_WORDS = ("one", "two", "three", "four")
TEMPLATES = (
    "{things} on a {bg} background",
    "a photo of {things} {where}",
    "{things} {where}, {bg} background",
    "a {bg} background with {things} {where}",
    "picture of {things} {where} on {bg}",
)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit integer from ``parts`` (independent of PYTHONHASHSEED and platform)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def things_phrase(count: int, color: str, shape: str) -> str:
    """``"three red circles"``, ``"an orange star"``: the noun phrase every template uses."""
    if count == 1:
        article = "an" if color[0] in "aeiou" else "a"
        return f"{article} {color} {shape}"
    return f"{COUNT_WORDS[count - 1]} {color} {SHAPES[shape]}"


def caption_for(spec: dict[str, Any], template: int) -> str:
    """Render ``spec``'s attributes through English template number ``template``."""
    return TEMPLATES[template % len(TEMPLATES)].format(
        things=things_phrase(spec["count"], spec["color"], spec["shape"]),
        where=POSITIONS[spec["position"]],
        bg=spec["background"],
    )


def sample_spec(idx: int, seed: int) -> dict[str, Any]:
    """Attributes and caption of sample ``idx``; a pure function of ``(idx, seed)``."""
    rng = random.Random(derive_seed("spec", seed, idx))
    color = rng.choice(list(COLORS))
    spec: dict[str, Any] = {
        "id": idx,
        "seed": seed,
        "shape": rng.choice(list(SHAPES)),
        "color": color,
        "count": rng.randint(1, len(COUNT_WORDS)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice([c for c in COLORS if c != color]),
        "template": rng.randrange(len(TEMPLATES)),
    }
    spec["caption"] = caption_for(spec, spec["template"])
    return spec


def image_size(idx: int, seed: int, size_range: tuple[int, int]) -> tuple[int, int]:
    """Native ``(width, height)`` of sample ``idx``: each side uniform in ``size_range``."""
    rng = random.Random(derive_seed("size", seed, idx))
    low, high = size_range
    return rng.randint(low, high), rng.randint(low, high)


def _region(position: str, width: int, height: int) -> tuple[float, float, float, float]:
    """The ``(x0, y0, x1, y1)`` box the shapes of a ``position`` are laid out in."""
    return {
        "left": (0.0, 0.0, width / 2, height),
        "right": (width / 2, 0.0, width, height),
        "top": (0.0, 0.0, width, height / 2),
        "bottom": (0.0, height / 2, width, height),
        "center": (width / 8, height / 4, 7 * width / 8, 3 * height / 4),
    }[position]


def _layout(spec: dict[str, Any], width: int, height: int) -> list[tuple[float, float, float, float]]:
    """``(cx, cy, radius, rotation_deg)`` per shape: one cell each along the region's long side."""
    rng = random.Random(derive_seed("layout", spec["seed"], spec["id"]))
    x0, y0, x1, y1 = _region(spec["position"], width, height)
    count = spec["count"]
    horizontal = (x1 - x0) >= (y1 - y0)
    cell_w = (x1 - x0) / count if horizontal else x1 - x0
    cell_h = y1 - y0 if horizontal else (y1 - y0) / count
    shapes = []
    for i in range(count):
        cx = x0 + cell_w * ((i if horizontal else 0) + 0.5)
        cy = y0 + cell_h * ((0 if horizontal else i) + 0.5)
        radius = 0.38 * min(cell_w, cell_h) * rng.uniform(0.8, 1.0)
        slack = 0.45 * min(cell_w, cell_h) - radius
        shapes.append(
            (cx + rng.uniform(-slack, slack), cy + rng.uniform(-slack, slack), radius, rng.uniform(-15, 15))
        )
    return shapes


def _star_points(n_points: int, inner: float) -> list[tuple[float, float]]:
    """Unit star outline alternating outer radius 1 and ``inner``, first tip pointing up."""
    return [
        ((1 if k % 2 == 0 else inner) * math.sin(math.pi * k / n_points),
         -(1 if k % 2 == 0 else inner) * math.cos(math.pi * k / n_points))
        for k in range(2 * n_points)
    ]


_UNIT_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _star_points(3, 0.5)[::2],
    "star": _star_points(5, 0.42),
    "diamond": [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)],
    "hexagon": [(math.cos(math.pi * k / 3), math.sin(math.pi * k / 3)) for k in range(6)],
    "cross": [
        (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
        (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
    ],
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill: tuple[int, int, int],
                cx: float, cy: float, radius: float, rotation: float) -> None:
    """Draw one ``shape`` of ``radius`` centred at ``(cx, cy)``, rotated by ``rotation`` degrees."""
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    draw.polygon(
        [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in _UNIT_OUTLINES[shape]],
        fill=fill,
    )


def _photo_background(rgb: tuple[int, int, int], width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A float HxWx3 background: ``rgb`` lit by a random linear gradient and soft blotches."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xs * np.cos(angle) + ys * np.sin(angle)) / max(width, height)
    light = 0.8 + 0.35 * (ramp - ramp.min())
    for _ in range(3):
        fx, fy = rng.uniform(0.5, 4, size=2) * 2 * np.pi
        phase = rng.uniform(0, 2 * np.pi)
        light += 0.05 * np.sin(fx * xs / width + fy * ys / height + phase)
    return np.asarray(rgb, np.float32)[None, None, :] * light[:, :, None]


def _photo_finish(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Soften edges and add sensor-like grain, which makes the JPEG photo-sized (~0.3 B/px at q90)."""
    soft = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    grain = rng.normal(0.0, 7.0, size=soft.shape).astype(np.float32)
    return Image.fromarray(np.clip(soft + grain, 0, 255).astype(np.uint8), "RGB")


def render(spec: dict[str, Any], width: int, height: int, *, photo_like: bool = False) -> Image.Image:
    """Draw ``spec`` as a ``width`` x ``height`` RGB image (pure function of its arguments).

    Flat mode paints solid colours (tiny JPEGs, fast).  ``photo_like`` adds a lit gradient,
    blotches, blur and grain so that 640-1024 px JPEGs weigh roughly 100-250 KB like web photos.
    """
    fill, bg = COLORS[spec["color"]], COLORS[spec["background"]]
    rng = np.random.default_rng(derive_seed("photo", spec["seed"], spec["id"], width, height))
    if photo_like:
        background = _photo_background(bg, width, height, rng)
        img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    for cx, cy, radius, rotation in _layout(spec, width, height):
        _draw_shape(draw, spec["shape"], fill, cx, cy, radius, rotation)
    return _photo_finish(img, rng) if photo_like else img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """Baseline JPEG encoding of ``img`` (converted to RGB), deterministic for equal inputs."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
