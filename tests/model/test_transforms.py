"""decode_rgb (modes, bombs, garbage) and the train/eval transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from align_ray.model import MEAN, STD, decode_rgb, eval_transform, train_transform


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_real_png(dev_rows):
    img = decode_rgb(dev_rows["image"][0])
    assert img.mode == "RGB" and img.size == (64, 64)


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = decode_rgb(_bytes(rgba))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    assert decode_rgb(_bytes(pal)).getpixel((0, 0)) == (0, 255, 0)
    pal.info["transparency"] = 0
    assert decode_rgb(_bytes(pal, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_rgb(_bytes(Image.new("L", (4, 4), 77))).getpixel((2, 2)) == (77, 77, 77)
    assert decode_rgb(_bytes(Image.new("LA", (4, 4), (0, 0)))).getpixel((0, 0)) == (255, 255, 255)
    assert decode_rgb(_bytes(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG")).mode == "RGB"
    i16 = Image.fromarray(np.full((4, 4), 1000, np.uint16))
    assert decode_rgb(_bytes(i16)).mode == "RGB"
    assert decode_rgb(_bytes(Image.new("1", (4, 4), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_garbage_truncated_and_empty_raise_value_error(dev_rows):
    for bad in (b"", b"not an image at all", dev_rows["image"][0][:60], b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(ValueError):
            decode_rgb(bad)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_rejected_before_decoding():
    bomb = _bytes(Image.new("1", (12000, 12000)))  # 144 Mpx, ~20 KB compressed
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="max_pixels|Decompression|exceeds"):
        decode_rgb(bomb)
    small = _bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(ValueError, match="max_pixels"):
        decode_rgb(small, max_pixels=5000)
    assert decode_rgb(small, max_pixels=10_000).size == (100, 100)


def test_eval_transform_resizes_centre_crops_and_normalises():
    img = Image.new("RGB", (120, 80), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 20, 80))  # black band on the left: cropped away by the centre crop
    x = eval_transform(64)(img)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    white = (1.0 - np.asarray(MEAN)) / np.asarray(STD)
    assert np.allclose(x[:, :, 2:], white[:, None, None], atol=1e-2)
    same = eval_transform(64)(Image.new("RGB", (64, 64), (124, 116, 104)))
    assert np.abs(same).max() < 0.02  # ~ImageNet mean colour -> ~0


def test_train_transform_random_crop_and_flip_reproducible():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8))
    a = [train_transform(32, seed=1)(img) for _ in range(2)]
    assert a[0].shape == (3, 32, 32) and a[0].dtype == np.float32
    assert np.array_equal(a[0], a[1])  # same seed, same crop
    t = train_transform(32, seed=2)
    outs = [t(img) for _ in range(4)]
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])
    flip_only = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, seed=0)
    sq = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert np.allclose(flip_only(sq), eval_transform(32)(sq)[:, :, ::-1], atol=1e-5)


def test_colour_augmentation_off_keeps_crops_on_changes_colours_only(dev_rows):
    img = decode_rgb(dev_rows["image"][0])
    plain = train_transform(64, scale=(0.5, 1.0), seed=3)
    off = train_transform(64, scale=(0.5, 1.0), seed=3, jitter=0.0, gray=0.0)
    for _ in range(3):  # the option at 0 draws nothing: the same crops and flips, step by step
        assert np.array_equal(plain(img), off(img))
    ident = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, scale=(1.0, 1.0), flip=0.0)
    base = train_transform(64, **ident)(img)
    gray = train_transform(64, seed=0, gray=1.0, **ident)(img)
    assert np.allclose(gray[0], gray[1], atol=0.51) and np.allclose(gray[1], gray[2], atol=0.51)
    assert not np.allclose(gray, base, atol=2)
    jit = train_transform(64, seed=0, jitter=0.8, **ident)
    outs = [jit(img) for _ in range(4)]
    assert all(o.shape == base.shape and 0 <= o.min() and o.max() <= 255 for o in outs)
    means = [tuple(o.reshape(3, -1).mean(1).round(1)) for o in outs]
    assert len(set(means)) == 4 and all(m != tuple(base.reshape(3, -1).mean(1).round(1)) for m in means)
    same_seed = [train_transform(64, seed=5, jitter=0.8, gray=0.5, **ident)(img) for _ in range(2)]
    assert np.array_equal(*same_seed)



def test_style_augmentation_off_draws_nothing_on_redraws_within_the_frame(dev_rows):
    from align_ray.model.transforms import restyle

    img = decode_rgb(dev_rows["image"][0])
    plain = train_transform(64, scale=(0.5, 1.0), seed=3)
    off = train_transform(64, scale=(0.5, 1.0), seed=3, style=0.0)
    for _ in range(3):
        assert np.array_equal(plain(img), off(img))
    ident = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, scale=(1.0, 1.0), flip=0.0)
    base = train_transform(64, **ident)(img)
    outs = [train_transform(64, seed=s, style=1.0, **ident)(img) for s in range(6)]
    assert all(o.shape == base.shape and 0 <= o.min() and o.max() <= 255 for o in outs)
    assert all(not np.allclose(o, base, atol=2) for o in outs)   # always at least one change
    assert np.array_equal(train_transform(64, seed=4, style=1.0, **ident)(img), outs[4])
    # each change alone: flat colours use few colours; outlines add dark pixels inside the frame,
    # none on it; the margin is white
    small = img.resize((64, 64))
    flat_only = restyle(small, _Rng([0.1, 0.9, 0.9], ints=[5]))
    assert len(set(flat_only.getdata())) <= 5
    lined = np.asarray(restyle(small, _Rng([0.9, 0.1, 0.9])))
    dark = (lined.max(axis=2) < 40)
    assert dark[1:-1, 1:-1].sum() > dark.size // 50 and not dark[0].any() and not dark[:, 0].any()
    shrunk = np.asarray(restyle(small, _Rng([0.9, 0.9, 0.1], uniforms=[0.8], ints=[0, 0])))
    assert (shrunk[-10:] == 255).all() and (shrunk[:, -10:] == 255).all()


class _Rng:
    """Scripted draws for restyle: which changes apply, then its integers and uniforms."""

    def __init__(self, picks, ints=(), uniforms=()):
        self.picks, self.ints, self.uniforms = np.asarray(picks), list(ints), list(uniforms)

    def random(self, n=None):
        return self.picks if n is not None else 0.9

    def integers(self, low, high=None):
        return self.ints.pop(0)

    def uniform(self, low, high):
        return self.uniforms.pop(0)

def test_image_norm_edge_cases(monkeypatch):
    """One image_norm for train and serve: a grayscale or half-filled pretrained_cfg is taken
    whole or not at all (ImageNet then), explicit values win one by one, and must be RGB."""
    from types import SimpleNamespace

    import timm

    from align_ray.model.config import ModelConfig
    from align_ray.model.transforms import image_norm

    cfgs = {"gray": SimpleNamespace(mean=(0.5,), std=(0.25,)),
            "half": SimpleNamespace(mean=(0.1, 0.2, 0.3), std=None),
            "rgb": SimpleNamespace(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))}

    def fake(name):
        if name not in cfgs:
            raise RuntimeError(f"no pretrained cfg for {name}")
        return cfgs[name]

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", fake)
    assert image_norm(ModelConfig(image_model="gray")) == (MEAN, STD)
    assert image_norm(ModelConfig(image_model="half")) == (MEAN, STD)
    assert image_norm(ModelConfig(image_model="unknown")) == (MEAN, STD)
    assert image_norm(ModelConfig(image_model="rgb")) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert image_norm(ModelConfig(image_model="rgb", image_std=(1, 1, 1))) == (
        (0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    assert image_norm(ModelConfig(image_model="gray", image_mean=(0.2, 0.2, 0.2))) == (
        (0.2, 0.2, 0.2), STD)
    with pytest.raises(ValueError, match="3 values"):
        image_norm(ModelConfig(image_model="rgb", image_mean=(0.5,)))


def test_eval_pixels_then_normalize_equals_eval_transform():
    from align_ray.model.transforms import eval_pixels, eval_transform, normalize

    img = Image.fromarray(np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3))
    px = eval_pixels(img, 16)
    assert px.dtype == np.uint8 and px.shape == (3, 16, 16)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.3, 0.4)
    np.testing.assert_allclose(normalize(px, mean, std), eval_transform(16, mean, std)(img),
                               rtol=0, atol=1e-5)
