"""Caption word dropout (``caption_word_drop``): which words a training caption shows, drawn
from the row's own seed, without touching the row's identity or validation captions; and the
drawing-style augmentation (``style_aug``) reaching the training pixels from the config."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from align_ray.model.tokenizer import train_wordpiece
from align_ray.train import preprocess, selection
from align_ray.train.config import TrainConfig

CAPTION = "grinning face with smiling eyes eye face grin happy laugh lol mouth open smile"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_drop_words_rate_and_floor():
    rng = np.random.default_rng(0)
    n = len(CAPTION.split())
    kept = [len(preprocess.drop_words(CAPTION, 0.3, rng).split()) for _ in range(2000)]
    assert abs(np.mean(kept) / n - 0.7) < 0.02
    # every word dropped: one stays
    assert len(preprocess.drop_words(CAPTION, 0.999, rng).split()) == 1
    assert preprocess.drop_words(CAPTION, 0.0, rng) == CAPTION
    assert preprocess.drop_words("single", 0.9, rng) == "single"
    assert set(preprocess.drop_words(CAPTION, 0.5, rng).split()) <= set(CAPTION.split())


@pytest.fixture(scope="module")
def tok_files():
    return preprocess.tokenizer_files(train_wordpiece([CAPTION] * 4, 100, 24))


def _pre(tok_files, *, train: bool, word_drop: float) -> preprocess.Preprocess:
    return preprocess.Preprocess(image_col="image", text_col="text",
                                 selection=selection.Selection(), image_size=8, train=train,
                                 tokenizer=tok_files, max_length=24, max_pixels=1 << 20,
                                 word_drop=word_drop)


def _batch(seeds: list[int]) -> dict[str, np.ndarray]:
    n = len(seeds)
    return {"image": np.array([_png()] * n, dtype=object), "text": np.array([CAPTION] * n),
            "aug_seed": np.asarray(seeds, np.int64)}


def test_seeded_rows_replay_their_words(tok_files):
    pre = _pre(tok_files, train=True, word_drop=0.4)
    a, b = pre(_batch([1, 2, 3, 1])), pre(_batch([1, 2, 3, 1]))
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])   # a resumed run replays them
    np.testing.assert_array_equal(a["input_ids"][0], a["input_ids"][3])
    assert len({tuple(r) for r in a["input_ids"][:3]}) == 3          # different seeds, words
    full = _pre(tok_files, train=True, word_drop=0.0)(_batch([1, 2, 3, 1]))
    assert (a["attention_mask"].sum(1) < full["attention_mask"].sum(1)).all()
    np.testing.assert_array_equal(a["row_id"], full["row_id"])       # identity: the whole caption
    np.testing.assert_array_equal(a["pixels"], full["pixels"])       # crops and flips unchanged


def test_validation_captions_stay_whole(tok_files):
    batch = {k: v for k, v in _batch([5, 6]).items() if k != "aug_seed"}
    val = _pre(tok_files, train=False, word_drop=0.5)(batch)
    ref = _pre(tok_files, train=False, word_drop=0.0)(batch)
    np.testing.assert_array_equal(val["input_ids"], ref["input_ids"])


def test_config_bounds():
    assert TrainConfig(data=["x"], output="o", caption_word_drop=0.3).caption_word_drop == 0.3
    with pytest.raises(ValueError, match="caption_word_drop"):
        TrainConfig(data=["x"], output="o", caption_word_drop=1.0)
    with pytest.raises(ValueError, match="style_aug"):
        TrainConfig(data=["x"], output="o", style_aug=1.5)


def test_style_aug_reaches_training_pixels_only(tok_files):
    from align_ray.train.ingest import _preprocess_kwargs

    def pre(style: float, train: bool = True) -> tuple[preprocess.Preprocess, str]:
        cfg = TrainConfig(data=["x"], output="o", image_col="image", style_aug=style)
        cfg.model.image_size = 8
        kwargs, key = _preprocess_kwargs(cfg, selection.Selection(), train=train,
                                         tokenizer=tok_files, counter=None, with_match=False)
        assert kwargs["style"] == style
        return preprocess.Preprocess(**kwargs), key

    (on, on_key), (off, off_key) = pre(1.0), pre(0.0)
    assert on_key != off_key   # a cached Preprocess is never reused across the option
    img = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 200 + 30,
                                  np.ones((16, 16), np.uint8))[..., None].repeat(3, 2))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    batch = {"image": np.array([buf.getvalue()] * 3, dtype=object),
             "text": np.array([CAPTION] * 3), "aug_seed": np.asarray([1, 2, 3], np.int64)}
    assert not np.array_equal(on(batch)["pixels"], off(batch)["pixels"])
    val = {k: v for k, v in batch.items() if k != "aug_seed"}
    np.testing.assert_array_equal(pre(1.0, train=False)[0](val)["pixels"],
                                  pre(0.0, train=False)[0](val)["pixels"])
