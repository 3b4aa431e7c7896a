"""Safe decode / resize / re-encode on crafted images (no network, no Ray)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.hashing import hamming, normalize_text, phash, text_hash
from align_ray.data.resizer import _jpeg_reduction, process_image
from align_ray.web.faults import png_bomb_bytes


def picture(w: int = 400, h: int = 300, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    for _ in range(6):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        cv2.circle(arr, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                   int(rng.integers(10, min(w, h) // 2)), c, -1)
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decoded(p) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(p.jpg, np.uint8), cv2.IMREAD_COLOR)


@pytest.mark.parametrize("mode,expect", [
    ("center_crop", (64, 64)), ("keep_ratio", (85, 64)), ("keep_ratio_largest", (64, 48)),
    ("border", (64, 64)), ("no", (400, 300)),
])
def test_resize_modes(mode, expect):
    p = process_image(encode(picture(), "JPEG"), DataConfig(image_size=64, resize_mode=mode))
    assert (p.width, p.height) == expect == decoded(p).shape[1::-1]
    assert (p.original_width, p.original_height) == (400, 300) and p.format == "jpeg"


def test_border_pads_with_border_color():
    cfg = DataConfig(image_size=64, resize_mode="border", border_color=[255, 0, 0])
    out = decoded(process_image(encode(picture(), "PNG"), cfg))
    assert out[0, 32].tolist() == pytest.approx([0, 0, 255], abs=8)  # BGR red band on top


def test_dct_reduction_keeps_short_side_at_least_target():
    cfg = DataConfig(image_size=256)
    assert _jpeg_reduction(1024, 768, cfg) == 2        # 384 >= 256, 192 < 256
    assert _jpeg_reduction(4000, 3000, cfg) == 8       # 375 >= 256
    assert _jpeg_reduction(300, 300, cfg) == 1
    assert _jpeg_reduction(300, 300, DataConfig(image_size=256, resize_mode="no")) == 1


def test_upscale_and_resize_only_if_bigger():
    small = encode(picture(40, 30), "JPEG")
    assert process_image(small, DataConfig(image_size=64)).width == 64
    p = process_image(small, DataConfig(image_size=64, resize_only_if_bigger=True))
    assert (p.width, p.height) == (30, 30)


def test_exif_orientation_applied():
    img = picture(320, 200)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = process_image(encode(img, "JPEG", exif=exif), DataConfig(image_size=100,
                                                                 resize_mode="keep_ratio"))
    assert (p.original_width, p.original_height) == (200, 320)
    assert (p.width, p.height) == (100, 160)


@pytest.mark.parametrize("make", [
    lambda im: encode(im.convert("CMYK"), "JPEG"),
    lambda im: encode(Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 257)), "PNG"),
    lambda im: encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
    lambda im: encode(im, "GIF", save_all=True, append_images=[im.rotate(90), im.rotate(180)]),
    lambda im: encode(im.convert("RGBA"), "WEBP"),
    lambda im: encode(im, "BMP"),
    lambda im: encode(im, "TIFF"),
    lambda im: encode(im.convert("LA"), "PNG"),
], ids=["cmyk", "png16", "palette_alpha", "animated_gif", "webp", "bmp", "tiff", "gray_alpha"])
def test_awkward_but_valid_images_decode(make):
    im = picture()
    p = process_image(make(im), DataConfig(image_size=64))
    out = decoded(p)
    assert out.shape == (64, 64, 3) and (p.original_width, p.original_height) == (400, 300)
    assert out.std() > 5  # not a blank or black frame


def test_cmyk_colours_survive():
    red = Image.new("RGB", (100, 100), (220, 20, 20))
    out = decoded(process_image(encode(red.convert("CMYK"), "JPEG"), DataConfig(image_size=32)))
    b, g, r = out[16, 16].tolist()
    assert r > 180 and g < 80 and b < 80


def test_transparency_composited_on_white():
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    out = decoded(process_image(encode(rgba, "PNG"), DataConfig(image_size=32)))
    assert out.min() > 240


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_body"),
    (b"<!doctype html><html><body>moved</body></html>", "not_an_image"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "unsupported_format"),
    (bytes(np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8)), "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "decode_error"),
])
def test_bad_bytes_dropped(data, reason):
    with pytest.raises(Drop) as e:
        process_image(data, DataConfig())
    assert e.value.reason == reason


def test_truncated_jpeg_dropped():
    data = encode(picture(), "JPEG")
    with pytest.raises(Drop) as e:
        process_image(data[: len(data) * 6 // 10], DataConfig())
    assert e.value.reason == "truncated_image"


def test_truncated_png_dropped():
    data = encode(picture(), "PNG")
    with pytest.raises(Drop) as e:
        process_image(data[: len(data) // 2], DataConfig())
    assert e.value.reason == "decode_error"


def test_png_bomb_rejected_from_header_without_allocating():
    import resource
    bomb = png_bomb_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(Drop) as e:
        process_image(bomb, DataConfig())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert e.value.reason == "too_many_pixels"
    assert "30000x30000" in e.value.detail or "900000000 pixels" in e.value.detail
    assert grown_mb < 100  # the 900 MB raster was never allocated


def test_pixel_cap_is_ours_below_pillows_own_limit():
    data = encode(picture(400, 300), "PNG")
    with pytest.raises(Drop) as e:
        process_image(data, DataConfig(max_pixels=100_000))
    assert e.value.reason == "too_many_pixels" and "400x300" in e.value.detail


def test_phash_near_duplicates_close_unrelated_far():
    base = picture(500, 400, seed=3)
    h0 = process_image(encode(base, "JPEG", quality=95), DataConfig()).phash
    near = [encode(base, "JPEG", quality=40), encode(base.resize((450, 360)), "JPEG"),
            encode(base, "PNG"), encode(base.resize((520, 416)), "WEBP")]
    for data in near:
        assert hamming(h0, process_image(data, DataConfig()).phash) <= 6
    far = [hamming(h0, process_image(encode(picture(500, 400, seed=s), "JPEG"),
                                     DataConfig()).phash) for s in range(10, 20)]
    assert min(far) > 12


def test_phash_is_64_bit_and_text_hash_normalises():
    assert 0 <= phash(np.zeros((10, 10), np.uint8)) < 2 ** 64
    assert normalize_text("  Red\u00a0CIRCLE \n") == "red circle"
    assert text_hash("Red  circle") == text_hash("red circle") != text_hash("red circles")
