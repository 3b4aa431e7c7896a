"""HTTP request/response models and the input checks that turn bad input into a 4xx.

Types are strict (a number is not a text, ``"10"`` is not a ``k``) and unknown fields are
rejected, so a typo gets a message rather than a default.  Size caps come from
:class:`~align_ray.serve.config.Limits` at run time, so they are checked in :func:`check_*`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from align_ray.serve.config import Limits

_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.I)


class APIError(Exception):
    """A client error: answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbedTextRequest(_Req):
    texts: list[StrictStr]


class EmbedImageRequest(_Req):
    images: list[StrictStr]


class SearchRequest(_Req):
    text: StrictStr | None = None
    image: StrictStr | None = None
    embedding: list[StrictFloat | StrictInt] | None = None
    k: StrictInt = 10
    modality: Literal["image", "text"] | None = None
    dedup: StrictBool = False
    # an ANN index's own search width for this request (recall for speed); exact search ignores it
    nprobe: StrictInt | None = None
    ef: StrictInt | None = None
    index: StrictStr | None = None      # a named index (ServeConfig.indexes); None = the default

    @model_validator(mode="after")
    def _one_query(self) -> "SearchRequest":
        given = [n for n in ("text", "image", "embedding") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'text', 'image' or 'embedding' "
                             f"(got {given or 'none'})")
        return self

    @property
    def target(self) -> str:
        """Index to search: as asked, else the other modality (text -> images, image -> texts)."""
        if self.modality:
            return self.modality
        return "text" if self.image is not None else "image"


class ClassifyRequest(_Req):
    image: StrictStr
    labels: list[StrictStr]
    templates: list[StrictStr] | None = None


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int


class SearchResponse(BaseModel):
    results: list[dict]


class ClassifyResponse(BaseModel):
    labels: list[str]
    scores: list[float]


def check_texts(texts: list[str], limits: Limits, what: str = "texts", max_items: int | None = None) -> None:
    cap = limits.max_texts if max_items is None else max_items
    if not texts:
        raise APIError(422, f"'{what}' must not be empty")
    if len(texts) > cap:
        raise APIError(413, f"too many {what}: {len(texts)} > {cap}")
    for i, t in enumerate(texts):
        check_text(t, limits, f"{what}[{i}]")


def check_text(text: str, limits: Limits, what: str = "text") -> None:
    if not text.strip():
        raise APIError(422, f"{what} is empty")
    if len(text) > limits.max_text_chars:
        raise APIError(413, f"{what} is {len(text)} characters long; the limit is {limits.max_text_chars}")


def check_k(k: int, limits: Limits) -> None:
    if not 1 <= k <= limits.max_k:
        raise APIError(422, f"k must be between 1 and {limits.max_k}, got {k}")


MAX_KNOB = 65536


def check_knobs(nprobe: int | None, ef: int | None) -> tuple[int | None, int | None]:
    for name, v in (("nprobe", nprobe), ("ef", ef)):
        if v is not None and not 1 <= v <= MAX_KNOB:
            raise APIError(422, f"{name} must be between 1 and {MAX_KNOB}, got {v}")
    return nprobe, ef


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:   # a JSON integer too large for a float (JSON integers are unbounded)
        return False


def check_embedding(vec: list[float], dim: int) -> None:
    if len(vec) != dim:
        raise APIError(422, f"embedding has {len(vec)} values; this model's dimension is {dim}")
    if not all(_finite(v) for v in vec):
        raise APIError(422, "embedding values must be finite numbers")
    if not any(v != 0 for v in vec):
        raise APIError(422, "embedding must not be all zeros")


def decode_image(b64: str, limits: Limits, what: str = "image") -> bytes:
    """base64 (optionally a ``data:`` URI) -> image bytes, after a header-only check of format
    and pixel count (so decompression bombs are refused before anything decodes them)."""
    s = _DATA_URI.sub("", b64.strip(), count=1)
    if not s:
        raise APIError(422, f"{what} is empty")
    if len(s) > (limits.max_image_bytes * 4) // 3 + 4:
        raise APIError(413, f"{what} is over {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what} is not valid base64") from None
    if not data:
        raise APIError(422, f"{what} is empty")
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    check_image_header(data, limits, what)
    return data


def check_image_header(data: bytes, limits: Limits, what: str = "image") -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, f"{what}: too many pixels (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise APIError(400, f"{what} is not a decodable image") from None
    if w <= 0 or h <= 0:
        raise APIError(400, f"{what} has no pixels")
    if w * h > limits.max_pixels:
        raise APIError(413, f"{what} is {w}x{h} pixels; the limit is {limits.max_pixels} pixels")
