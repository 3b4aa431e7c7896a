"""ALIGN-style noise applied while planning a URL list.

ALIGN trains on raw alt-text with only light filtering, so a realistic corpus must contain the
junk those filters target: file-name and generic alt-texts, boilerplate alt-texts shared by many
images, keyword stuffing and other languages (text noise); and exact duplicates under many URLs,
re-encoded near-duplicates, tiny thumbnails and banner-shaped images (image noise).  Each planned
pair records which kind was applied, so a pipeline's filters can be scored against ground truth.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from align_ray.web.synth import SHAPES, TEMPLATES, caption_for, derive_seed

TEXT_NOISE = ("filename_alt", "generic_alt", "shared_alt", "keyword_stuffing", "non_english")
IMAGE_NOISE = ("dup_image", "near_dup", "tiny", "extreme_aspect")
NOISE_KINDS = ("clean", *TEXT_NOISE, *IMAGE_NOISE)
NOISE_WEIGHTS: dict[str, float] = {
    "clean": 0.55,
    "filename_alt": 0.06,
    "generic_alt": 0.06,
    "shared_alt": 0.05,
    "keyword_stuffing": 0.05,
    "non_english": 0.06,
    "dup_image": 0.06,
    "near_dup": 0.04,
    "tiny": 0.04,
    "extreme_aspect": 0.03,
}
GENERIC_ALTS = ("image", "photo", "untitled", "1920x1080", "picture", "img", "thumbnail", "banner")
SHARED_ALTS = ("click here to enlarge", "product image")
TINY_SIZES = ((40, 30), (32, 32), (48, 36), (16, 16))
EXTREME_SIZES = ((900, 120), (120, 900), (1000, 90))
POPULAR = 8  # exact duplicates copy one of the first POPULAR images, so each has many URLs
SPAM_WORDS = ("cheap", "buy", "best", "free shipping", "sale", "online", "hd", "wallpaper", "new", "2021")

# Per language: shape (singular, plural), colour word, background colour word, position phrase
# and templates.  Digits instead of number words sidestep grammatical gender.
_TRANSLATIONS: dict[str, dict[str, Any]] = {
    "de": {
        "shapes": {"circle": ("Kreis", "Kreise"), "square": ("Quadrat", "Quadrate"),
                   "triangle": ("Dreieck", "Dreiecke"), "star": ("Stern", "Sterne"),
                   "diamond": ("Raute", "Rauten"), "hexagon": ("Sechseck", "Sechsecke"),
                   "cross": ("Kreuz", "Kreuze")},
        "colors": {"red": "Rot", "green": "Grün", "blue": "Blau", "yellow": "Gelb", "purple": "Lila",
                   "orange": "Orange", "pink": "Rosa", "white": "Weiß", "black": "Schwarz"},
        "positions": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
                      "center": "in der Mitte"},
        "templates": ("{n} {shape} in {color}, Hintergrund {bg}", "Foto: {n} {shape} in {color} {where}"),
    },
    "fr": {
        "shapes": {"circle": ("cercle", "cercles"), "square": ("carré", "carrés"),
                   "triangle": ("triangle", "triangles"), "star": ("étoile", "étoiles"),
                   "diamond": ("losange", "losanges"), "hexagon": ("hexagone", "hexagones"),
                   "cross": ("croix", "croix")},
        "colors": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
                   "orange": "orange", "pink": "rose", "white": "blanc", "black": "noir"},
        "positions": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas",
                      "center": "au centre"},
        "templates": ("{n} {shape} de couleur {color} sur fond {bg}",
                      "photo de {n} {shape} de couleur {color} {where}"),
    },
    "es": {
        "shapes": {"circle": ("círculo", "círculos"), "square": ("cuadrado", "cuadrados"),
                   "triangle": ("triángulo", "triángulos"), "star": ("estrella", "estrellas"),
                   "diamond": ("rombo", "rombos"), "hexagon": ("hexágono", "hexágonos"),
                   "cross": ("cruz", "cruces")},
        "colors": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
                   "orange": "naranja", "pink": "rosa", "white": "blanco", "black": "negro"},
        "positions": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
                      "center": "en el centro"},
        "templates": ("{n} {shape} de color {color} sobre fondo {bg}",
                      "foto de {n} {shape} de color {color} {where}"),
    },
    "ja": {
        "shapes": {"circle": ("円", "円"), "square": ("四角形", "四角形"), "triangle": ("三角形", "三角形"),
                   "star": ("星", "星"), "diamond": ("ひし形", "ひし形"), "hexagon": ("六角形", "六角形"),
                   "cross": ("十字", "十字")},
        "colors": {"red": "赤", "green": "緑", "blue": "青", "yellow": "黄色", "purple": "紫",
                   "orange": "オレンジ", "pink": "ピンク", "white": "白", "black": "黒"},
        "positions": {"left": "左", "right": "右", "top": "上", "bottom": "下", "center": "中央"},
        "templates": ("{bg}の背景に{color}の{shape}が{n}つ", "{where}に{color}の{shape}が{n}つある写真"),
    },
}


@dataclass(frozen=True)
class PlannedPair:
    """One URL-list entry before the server's base URL is prepended."""

    path: str  # server-relative, e.g. "/img/17.jpg?w=40&h=30"
    caption: str
    noise: str  # one of NOISE_KINDS


def filename_alt(rng: random.Random) -> str:
    """An alt-text that is just a camera or CMS file name."""
    return rng.choice((
        f"IMG_{rng.randint(1000, 9999)}.jpg",
        f"DSC{rng.randint(0, 99999):05d}.JPG",
        f"P{rng.randint(1000000, 9999999)}.JPG",
        f"image-{rng.randint(1, 999)}.png",
        f"{rng.getrandbits(48):012x}.jpeg",
        f"Screenshot_2019-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}.png",
    ))


def keyword_stuffing(spec: dict[str, Any], rng: random.Random) -> str:
    """SEO spam around the true colour and shape: relevant words, useless as a caption."""
    color, shape = spec["color"], spec["shape"]
    vocabulary = [f"{color} {shape}", f"{color} {SHAPES[shape]}", color, shape, *SPAM_WORDS]
    words = [f"{color} {shape}", f"{color} {shape}"]
    words += [rng.choice(vocabulary) for _ in range(rng.randint(10, 25))]
    return " ".join(words)


def non_english(spec: dict[str, Any], rng: random.Random) -> str:
    """A correct description of ``spec`` in German, French, Spanish or Japanese."""
    table = _TRANSLATIONS[rng.choice(sorted(_TRANSLATIONS))]
    singular, plural = table["shapes"][spec["shape"]]
    return rng.choice(table["templates"]).format(
        n=spec["count"],
        shape=singular if spec["count"] == 1 else plural,
        color=table["colors"][spec["color"]],
        bg=table["colors"][spec["background"]],
        where=table["positions"][spec["position"]],
    )


def noisy_alt(kind: str, spec: dict[str, Any], rng: random.Random) -> str:
    """The alt-text of a text-noise ``kind`` for an image described by ``spec``."""
    if kind == "filename_alt":
        return filename_alt(rng)
    if kind == "generic_alt":
        return rng.choice(GENERIC_ALTS)
    if kind == "shared_alt":
        return rng.choice(SHARED_ALTS)
    if kind == "keyword_stuffing":
        return keyword_stuffing(spec, rng)
    if kind == "non_english":
        return non_english(spec, rng)
    raise ValueError(f"not a text-noise kind: {kind!r}")


def _pick_kind(rng: random.Random, noise: bool, has_previous: bool) -> str:
    """Draw a noise kind by NOISE_WEIGHTS; duplicates need an earlier image to copy."""
    if not noise:
        return "clean"
    kind = rng.choices(list(NOISE_WEIGHTS), weights=list(NOISE_WEIGHTS.values()))[0]
    return "clean" if kind in ("dup_image", "near_dup") and not has_previous else kind


def _image_noise(kind: str, ids: Sequence[int], position: int, rng: random.Random,
                 spec: Callable[[int], dict[str, Any]],
                 size: Callable[[int], tuple[int, int]]) -> PlannedPair:
    """Pair ``position`` with its image altered: a copy or re-encode of an image from
    ``ids[:position]``, or its own image at a tiny or banner-like size."""
    idx = ids[position]
    if kind == "dup_image":
        source = ids[rng.randrange(min(position, POPULAR))]
        path = f"/img/{source}.jpg?copy={idx}"
    elif kind == "near_dup":
        source = ids[rng.randrange(position)]
        width, height = size(source)
        factor = rng.uniform(0.85, 0.97)
        path = f"/img/{source}.jpg?w={round(width * factor)}&h={round(height * factor)}&q={rng.randint(60, 85)}"
    else:
        source = idx
        width, height = rng.choice(TINY_SIZES if kind == "tiny" else EXTREME_SIZES)
        path = f"/img/{idx}.jpg?w={width}&h={height}"
    return PlannedPair(path, caption_for(spec(source), rng.randrange(len(TEMPLATES))), kind)


def plan_pairs(ids: Sequence[int], seed: int, *, spec: Callable[[int], dict[str, Any]],
               size: Callable[[int], tuple[int, int]], noise: bool = True) -> list[PlannedPair]:
    """One pair per image id in ``ids``, with noise drawn per id (deterministic given ``seed``).

    ``spec(id)`` and ``size(id)`` describe the image the server returns for ``/img/<id>.jpg``.
    Each row's draw depends only on ``(seed, id)`` and the ids before it, so lists are
    prefix-stable: planning more rows never changes the earlier ones.
    """
    pairs = []
    for position, idx in enumerate(ids):
        rng = random.Random(derive_seed("noise", seed, idx))
        kind = _pick_kind(rng, noise, position > 0)
        if kind in IMAGE_NOISE:
            pairs.append(_image_noise(kind, ids, position, rng, spec, size))
        elif kind == "clean":
            pairs.append(PlannedPair(f"/img/{idx}.jpg", spec(idx)["caption"], kind))
        else:
            pairs.append(PlannedPair(f"/img/{idx}.jpg", noisy_alt(kind, spec(idx), rng), kind))
    return pairs
