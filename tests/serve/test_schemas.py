"""Request checks that turn bad input into 4xx, without a server (the HTTP path is covered by
test_malformed.py)."""

from __future__ import annotations

import base64
import io

import pytest

from align_ray.serve.config import Limits
from align_ray.serve.schemas import (APIError, SearchRequest, check_embedding, check_k,
                                     check_texts, decode_image)
from tests.serve.malformed import jpeg_bytes, png_bomb

LIM = Limits(max_image_bytes=64 << 10, max_pixels=1_000_000, max_texts=3, max_text_chars=10, max_k=50)


def _status(fn, *args) -> int:
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.message
    return e.value.status


def test_decode_image_accepts_plain_and_data_uri_base64():
    jpg = jpeg_bytes()
    b64 = base64.b64encode(jpg).decode()
    assert decode_image(b64, LIM) == jpg
    assert decode_image("data:image/jpeg;base64," + b64, LIM) == jpg


@pytest.mark.parametrize("payload, status", [
    ("", 422), ("@@@@", 400), ("abc", 400), (base64.b64encode(b"plain text").decode(), 400),
    (base64.b64encode(png_bomb()).decode(), 413),
    (base64.b64encode(png_bomb(2000, 2000)).decode(), 413),
    (base64.b64encode(b"\0" * (70 << 10)).decode(), 413),
])
def test_decode_image_refusals(payload, status):
    assert _status(decode_image, payload, LIM) == status


def test_bomb_is_refused_from_the_header_alone():
    from PIL import Image

    im = Image.new("L", (1100, 1000))           # 1.1 Mpx > max_pixels, ~1 KB compressed
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    assert _status(decode_image, base64.b64encode(buf.getvalue()).decode(), LIM) == 413


def test_text_and_k_and_embedding_checks():
    assert _status(check_texts, [], LIM) == 422
    assert _status(check_texts, ["a"] * 4, LIM) == 413
    assert _status(check_texts, ["a", "b" * 11], LIM) == 413
    assert _status(check_texts, [" \n"], LIM) == 422
    check_texts(["ok", "b" * 10], LIM)
    assert _status(check_k, 0, LIM) == 422 and _status(check_k, 51, LIM) == 422
    check_k(50, LIM)
    assert _status(check_embedding, [1.0, float("nan")], 2) == 422
    assert _status(check_embedding, [0.0, 0.0], 2) == 422
    assert _status(check_embedding, [1.0], 2) == 422
    check_embedding([1, 0.5], 2)


def test_search_request_needs_exactly_one_query_and_picks_the_other_modality():
    from pydantic import ValidationError

    assert SearchRequest(text="a").target == "image"
    assert SearchRequest(image="x").target == "text"
    assert SearchRequest(embedding=[1.0], modality="text").target == "text"
    for bad in ({}, {"text": "a", "image": "b"}, {"text": "a", "k": "3"}, {"text": "a", "k": True},
                {"text": "a", "modality": "video"}, {"text": "a", "typo": 1}):
        with pytest.raises(ValidationError):
            SearchRequest.model_validate(bad)
