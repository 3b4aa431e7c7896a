"""One image preprocessing for train and serve: a validation row, as training's data workers
(``preprocess.Preprocess(train=False)``, uint8) and the trainer (``loop.Normalize``) prepare it, is
the same tensor that eval, index and serve (``Embedder``) feed the model for the same bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from align_ray.model import DualEncoder, ModelConfig, load_pretrained, save_pretrained
from align_ray.model.pretrained import Embedder
from align_ray.model.tokenizer import train_wordpiece
from align_ray.train import preprocess, selection
from align_ray.train.loop import Normalize

SIZE = 32


def _gradient(w: int, h: int) -> np.ndarray:
    """Smooth but not constant content, so resize/crop/normalise mistakes show up."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     (x + y) * 255 // max(w + h - 2, 1)], axis=-1).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgba_png() -> bytes:
    rgba = np.dstack([_gradient(40, 40), np.linspace(0, 255, 40 * 40).reshape(40, 40)])
    return _encode(Image.fromarray(rgba.astype(np.uint8), "RGBA"), "PNG")


def _palette_png() -> bytes:
    return _encode(Image.fromarray(_gradient(48, 36)).convert("P", palette=Image.ADAPTIVE), "PNG")


def _gray_jpeg(w: int, h: int) -> bytes:
    return _encode(Image.fromarray(_gradient(w, h)[..., 0], "L"), "JPEG", quality=90)


IMAGES = {
    "rgba_png": _rgba_png,
    "palette_png": _palette_png,
    # below 2 x SIZE per side: the serving side's JPEG draft decode has nothing to reduce
    "gray_jpeg": lambda: _gray_jpeg(50, 40),
    "non_square_png": lambda: _encode(Image.fromarray(_gradient(90, 30)), "PNG"),
    "non_square_rgb_jpeg": lambda: _encode(Image.fromarray(_gradient(60, 45)), "JPEG"),
}


@pytest.fixture(scope="module", params=[
    {"image_mean": (0.3, 0.4, 0.5), "image_std": (0.2, 0.25, 0.3)},   # explicit norm
    {},                                                                # from timm / ImageNet
], ids=["explicit_norm", "default_norm"])
def saved(request, tmp_path_factory):
    """The train side's ModelConfig and the Embedder of the same model after save/load."""
    tok = train_wordpiece(["a red square", "a blue circle"] * 4, 100, 16)
    cfg = ModelConfig.tiny(image_model="test_efficientnet", image_size=SIZE, embed_dim=8,
                           max_length=16, **request.param)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("m")
    save_pretrained(DualEncoder(cfg, len(tok)), tok, cfg, str(out))
    model, tok2, loaded = load_pretrained(str(out))
    return cfg, tok, Embedder(model, tok2, loaded)


def _train_side(cfg: ModelConfig, tok, data: bytes) -> torch.Tensor:
    pre = preprocess.Preprocess(image_col="image", text_col="text", selection=selection.Selection(),
                            image_size=cfg.image_size, train=False,
                            tokenizer=preprocess.tokenizer_files(tok), max_length=cfg.max_length,
                            max_pixels=1 << 24)
    out = pre({"image": np.array([data], dtype=object), "text": np.array(["a red square"])})
    assert out["pixels"].dtype == np.uint8 and out["pixels"].shape == (1, 3, SIZE, SIZE)
    return Normalize(cfg, torch.device("cpu"))(torch.from_numpy(out["pixels"]))[0]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_train_validation_equals_embedder(saved, name):
    cfg, tok, embedder = saved
    data = IMAGES[name]()
    train = _train_side(cfg, tok, data).numpy()
    serve = embedder.preprocess([data])[0]
    assert serve.dtype == np.float32 and serve.shape == train.shape
    np.testing.assert_allclose(serve, train, rtol=0, atol=1e-5)
    # the comparison has teeth: a one-level change of one pixel is 1/(255 std) > 1e-2 apart
    assert np.abs(train).max() > 0.5


def test_norm_survives_save_and_load(saved):
    cfg, _, embedder = saved
    mean, std = Normalize(cfg, torch.device("cpu")).mean, Normalize(cfg, torch.device("cpu")).std
    assert np.allclose(mean.flatten().numpy() / 255, embedder.mean)
    assert np.allclose(std.flatten().numpy() / 255, embedder.std)


def test_large_jpeg_train_validation_equals_embedder(saved):
    cfg, tok, embedder = saved
    data = _encode(Image.fromarray(_gradient(4 * SIZE, 3 * SIZE)), "JPEG", quality=90)
    np.testing.assert_allclose(embedder.preprocess([data])[0], _train_side(cfg, tok, data).numpy(),
                               rtol=0, atol=1e-5)
