"""Which rows a training, validation or scoring dataset keeps, and the stable ids of rows.

* ``row_id`` = 64-bit BLAKE2b of (caption, image bytes): a stable identity per sample.
* Held-out rows (``val_fraction``) are chosen by a hash of the *caption*, so no validation caption
  is ever a training caption, and cross-fitting folds (``folds``) cut the same caption hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

_BUCKETS = 1_000_000


def _hash64(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little", signed=True)


def row_id(text: str, image: bytes) -> int:
    return _hash64(text.encode("utf-8", "replace"), image or b"")


def value_id(value: Any) -> int:
    """A stable int64 for a match value (str/number/None)."""
    return _hash64(repr(value).encode("utf-8", "replace"))


def text_bucket(text: str) -> int:
    return (_hash64(text.encode("utf-8", "replace")) % _BUCKETS + _BUCKETS) % _BUCKETS


def caption_fold(text: str, folds: int) -> int:
    """The cross-fitting fold of a caption: its hash bucket mod ``folds``.  The holdout cuts
    buckets by *value* (bucket < fraction x buckets), so a fold takes the same share of every
    split."""
    return text_bucket(text if isinstance(text, str) else "") % folds


@dataclass(frozen=True)
class Selection:
    """Which rows of the input a dataset keeps: rows whose ``split_col`` equals ``split_value``,
    and/or the caption-hash holdout (``holdout=True`` keeps the held-out share, else the rest),
    less the caption-hash fold ``exclude_fold`` of ``folds`` (cross-fitting, when folds >= 2)."""

    split_col: str | None = None
    split_value: str | None = None
    holdout_fraction: float = 0.0
    holdout: bool = False
    folds: int = 0
    exclude_fold: int = -1

    def columns(self) -> list[str]:
        return [self.split_col] if self.split_col else []

    def mask(self, texts: list[str], split_values: Any = None) -> np.ndarray:
        keep = np.ones(len(texts), dtype=bool)
        if self.split_col:
            keep &= np.asarray([str(v) == self.split_value for v in split_values], dtype=bool)
        if self.holdout_fraction > 0:
            cut = int(self.holdout_fraction * _BUCKETS)
            held = np.asarray([text_bucket(t) < cut for t in texts], dtype=bool)
            keep &= held if self.holdout else ~held
        if self.folds >= 2:
            keep &= np.asarray([caption_fold(t, self.folds) != self.exclude_fold for t in texts],
                               dtype=bool)
        return keep


def selections(cfg) -> tuple[tuple[list[str], Selection], tuple[list[str], Selection] | None]:
    """(train paths, selection), (val paths, selection) or None, per TrainConfig's val options;
    with ``folds`` >= 2 the training rows also leave out caption-hash fold ``fold``."""
    fold = {"folds": cfg.folds, "exclude_fold": cfg.fold} if cfg.folds >= 2 else {}
    if cfg.val_data:
        return (cfg.data, Selection(**fold)), (cfg.val_data, Selection())
    if cfg.split_col:
        return ((cfg.data, Selection(cfg.split_col, cfg.train_split, **fold)),
                (cfg.data, Selection(cfg.split_col, cfg.val_split)))
    if cfg.val_fraction > 0:
        return ((cfg.data, Selection(holdout_fraction=cfg.val_fraction, holdout=False, **fold)),
                (cfg.data, Selection(holdout_fraction=cfg.val_fraction, holdout=True)))
    return (cfg.data, Selection(**fold)), None
