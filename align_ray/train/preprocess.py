"""Decode + augment images and tokenize captions on Ray Data CPU tasks (one
:class:`Preprocess` per worker process), and count the images that cannot be decoded.

Output columns: ``pixels`` [n,3,S,S] **uint8** (crop/flip/resize done; the trainer normalises
with the model's mean/std on its device), ``input_ids`` / ``attention_mask`` [n,L] int64,
``row_id`` int64, ``match_id`` int64 for validation sets, and the stream position columns of
training rows (``STREAM_COLUMNS``).  Undecodable images are skipped, never fatal.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import ray

from align_ray.model.tokenizer import CaptionEncoder, load_tokenizer
from align_ray.model.transforms import decode_rgb, eval_transform, train_transform
from align_ray.train.selection import Selection, row_id, value_id

log = logging.getLogger(__name__)
STREAM_COLUMNS = ("pos_epoch", "pos_offset", "src_file")
# a caption's word-drop draws come from its row's aug_seed mixed with this, so they are
# independent of the same row's crop and flip draws and replay on resume
_WORD_DROP_STREAM = 0x7E47


def drop_words(text: str, p: float, rng: np.random.Generator) -> str:
    """Each whitespace-separated word of ``text`` dropped with probability ``p``; at least one
    word always stays.  Why: alt-texts are often a name plus a list of keywords; seeing random
    subsets teaches the text tower each word's share of the meaning instead of one whole
    string per image (which a small caption set lets it memorise)."""
    words = text.split()
    if p <= 0 or len(words) < 2:
        return text
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The saved tokenizer as {file name: bytes}: small, picklable, shipped to Ray workers."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, bytes], max_length: int | None = None):
    d = tempfile.mkdtemp(prefix="align-tok-")
    for name, data in files.items():
        Path(d, name).write_bytes(data)
    return load_tokenizer(d, max_length=max_length)


def caption_encoder(files: dict[str, bytes], max_length: int):
    """captions -> (input_ids, attention_mask), int64 [n, max_length]: the ``tokenizers``
    library alone where it can reproduce the saved tokenizer (:class:`CaptionEncoder`), else
    the transformers tokenizer."""
    fast = CaptionEncoder.from_files(files, max_length)
    if fast is not None:
        return fast
    tok = tokenizer_from_files(files, max_length)

    def encode(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = tok(captions, padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np", return_token_type_ids=False)
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    return encode


@ray.remote(num_cpus=0)
class BadImageCounter:
    """Distinct row_ids of undecodable images (a named actor, fire-and-forget adds)."""

    def __init__(self) -> None:
        self._ids: set[int] = set()

    def add(self, ids: list[int]) -> None:
        self._ids.update(ids)

    def count(self) -> int:
        return len(self._ids)


class Preprocess:
    """Select rows, decode + augment images, tokenize captions (one per Ray Data worker)."""

    def __init__(self, *, image_col: str, text_col: str, selection: Selection, image_size: int,
                 train: bool, tokenizer: dict[str, bytes],
                 max_length: int, max_pixels: int, match_col: str | None = None,
                 with_match: bool = False, counter: str | None = None,
                 crop_scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.0, grayscale: float = 0.0,
                 word_drop: float = 0.0, style: float = 0.0,
                 text_spec: str | None = None) -> None:
        self.image_col, self.text_col, self.selection = image_col, text_col, selection
        self.match_col, self.with_match, self.size = match_col, with_match, image_size
        self.max_length, self.max_pixels, self.counter = max_length, max_pixels, counter
        # a library model (train --init-from) brings its own tokenizer: model/finetune.py
        self.tok = None if text_spec else caption_encoder(tokenizer, max_length)
        if text_spec:
            from align_ray.model.finetune import text_tokenizer

            self.text_tok = text_tokenizer(text_spec, max_length)
        # mean 0 / std 1/255 makes the transforms return the resized pixels as 0..255 floats
        ident = ((0.0, 0.0, 0.0), (1 / 255.0,) * 3)
        aug = dict(scale=tuple(crop_scale), flip=hflip, jitter=color_jitter, gray=grayscale,
                   style=style)
        self.transform = (train_transform(image_size, *ident, **aug) if train
                          else eval_transform(image_size, *ident))
        # training rows with an ``aug_seed`` (RankStream) get their own seeded augmentation
        self.seeded = (lambda s: train_transform(image_size, *ident, seed=s, **aug)) \
            if train else None
        # validation rows decode like the Embedder that serves the model (``decode_draft``: our
        # models from a JPEG DCT draft at the model size, a library model (text_spec) every
        # pixel), so train-time val metrics and served embeddings see the same pixels
        self.draft = None if train or text_spec else image_size
        self.word_drop = word_drop if train else 0.0
        self._text_rng = np.random.default_rng()  # rows without an aug_seed (not RankStream)
        self.bad_total = 0

    def _report_bad(self, ids: list[int]) -> None:
        self.bad_total += len(ids)
        log.warning("skipped %d undecodable image(s) in this batch (%d so far in worker pid %d)",
                    len(ids), self.bad_total, os.getpid())
        if self.counter:
            try:
                ray.get_actor(self.counter).add.remote(ids)
            except ValueError:  # counter gone (driver exited): the log line is all we have
                pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [t if isinstance(t, str) else "" for t in batch[self.text_col]]
        images = batch[self.image_col]
        split = batch[self.selection.split_col] if self.selection.split_col else None
        keep = self.selection.mask(texts, split)
        seeds = batch.get("aug_seed") if self.seeded is not None else None
        pixels, ids, kept, bad = [], [], [], []
        for i in np.flatnonzero(keep):
            data = images[i]
            rid = row_id(texts[i], bytes(data) if data is not None else b"")
            transform = self.transform if seeds is None else self.seeded(int(seeds[i]))
            try:
                if data is None or len(data) == 0:
                    raise ValueError("empty image")
                arr = transform(decode_rgb(bytes(data), max_pixels=self.max_pixels,
                                           draft=self.draft))
            except ValueError:
                bad.append(rid)
                continue
            pixels.append(np.rint(arr).clip(0, 255).astype(np.uint8))
            ids.append(rid)
            kept.append(int(i))
        if bad:
            self._report_bad(bad)
        captions = [texts[i] for i in kept]
        if self.word_drop > 0:  # after row_id: a row keeps its identity whatever words it shows
            rngs = ([np.random.default_rng([int(seeds[i]), _WORD_DROP_STREAM]) for i in kept]
                    if seeds is not None else [self._text_rng] * len(kept))
            captions = [drop_words(c, self.word_drop, r) for c, r in zip(captions, rngs)]
        n, L = len(kept), self.max_length
        out: dict[str, np.ndarray] = {
            "pixels": (np.stack(pixels) if n
                       else np.zeros((0, 3, self.size, self.size), np.uint8)),
            "row_id": np.asarray(ids, dtype=np.int64),
        }
        if n and self.tok is None:
            out["input_ids"], out["attention_mask"] = self.text_tok(captions)
        elif n:
            out["input_ids"], out["attention_mask"] = self.tok(captions)
        else:
            out["input_ids"] = np.zeros((0, L), np.int64)
            out["attention_mask"] = np.zeros((0, L), np.int64)
        for col in STREAM_COLUMNS:  # the stream position travels with the row (RankStream)
            if col in batch:
                out[col] = np.asarray(batch[col])[np.asarray(kept, dtype=np.int64)]
        if self.with_match:
            vals = batch[self.match_col] if self.match_col else np.asarray(texts, dtype=object)
            out["match_id"] = np.asarray([value_id(vals[i]) for i in kept], dtype=np.int64)
        return out


_CACHE: dict[str, Preprocess] = {}


def preprocess_batch(batch: dict[str, np.ndarray], *, cache_key: str, **kwargs) -> dict:
    """Task-based ``map_batches`` function: one :class:`Preprocess` per worker process (cached),
    so every epoch's re-execution of the pipeline reuses warm Ray workers (imports, tokenizer)
    instead of starting a fresh actor pool."""
    pre = _CACHE.get(cache_key)
    if pre is None:
        pre = _CACHE[cache_key] = Preprocess(**kwargs)
    return pre(batch)


def preprocess_nonempty(batch: dict[str, np.ndarray], *, cache_key: str, **kwargs
                        ) -> Iterator[dict]:
    """:func:`preprocess_batch` as a generator that yields no block for a batch none of whose
    rows was kept (a block of the file with no row of the validation split, say).  Ray (2.60)
    cannot build its tensor column from a 0-row multi-dimensional array: it pickled that
    block instead, with an ArrowConversionError warning in every run with a validation split."""
    out = preprocess_batch(batch, cache_key=cache_key, **kwargs)
    if len(out["row_id"]):
        yield out
