"""``align-ray eval``: a saved model (``save_pretrained`` dir, HF dir or ``open_clip:`` spec; see
:func:`~align_ray.model.pretrained.load_embedder`) on a parquet of image bytes + captions.

Streams the file(s) in record batches with pyarrow (local or ``s3://``; no Ray), embeds images and
captions with :class:`~align_ray.model.pretrained.Embedder`, skips undecodable images (counted),
then computes the exact retrieval metrics and, with ``classify_col``, zero-shot classification.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.dataset as pads

from align_ray import layout
from align_ray.train.evaluate import DEFAULT_TEMPLATES, retrieval_metrics, zero_shot_classify

if TYPE_CHECKING:  # EvalConfig is imported by every CLI parser: no torch/Ray at import time
    from align_ray.model.pretrained import Embedder
    from align_ray.train.selection import Selection

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """``align-ray eval`` (flags, ``--config`` YAML) and the workflow's eval stage."""

    model: str = ""                       # our RUN_DIR/model, an HF save_pretrained dir, open_clip:ARCH:CKPT
    data: list[str] = field(default_factory=list)  # stage output dir, parquet file/folder/glob
    image_col: str | None = None          # None: jpg if present, else image
    text_col: str = "text"
    match_col: str | None = None          # rows sharing this value are correct for each other
    classify_col: str | None = None       # class label column (zero-shot classification)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    split_col: str | None = None          # only rows whose split_col == split
    split: str | None = None
    max_rows: int | None = None           # evaluate the first N selected rows only
    batch_size: int = 128
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if bool(self.split_col) != bool(self.split):
            raise ValueError("split_col and split go together (--split-col / --split)")


def _embed_images_skipping(embedder: Embedder, images: list) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings of the decodable images, boolean mask of which ones they are)."""
    ok = np.ones(len(images), dtype=bool)
    try:
        return embedder.embed_images(images), ok
    except ValueError:
        pixels = []
        for i, item in enumerate(images):
            try:
                if item is None:
                    raise ValueError("missing image")
                pixels.append(embedder.preprocess([item])[0])
            except ValueError:
                ok[i] = False
        if not pixels:
            return np.zeros((0, embedder.dim), np.float32), ok
        return embedder.embed_pixels(np.stack(pixels)), ok


def evaluate(cfg: EvalConfig, embedder: Embedder | None = None,
             selection: Selection | None = None) -> dict[str, Any]:
    from align_ray.model.pretrained import load_embedder
    from align_ray.train.selection import Selection
    from align_ray.train.ingest import resolve_inputs

    embedder = embedder or load_embedder(cfg.model, device=cfg.device, batch_size=cfg.batch_size)
    if selection is None:
        selection = (Selection(cfg.split_col, cfg.split) if cfg.split_col else Selection())
    fs, files = resolve_inputs(cfg.data)
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    image_col = cfg.image_col or layout.default_image_col(dataset.schema.names)
    cols = list(dict.fromkeys([image_col, cfg.text_col, *selection.columns(),
                               *[c for c in (cfg.match_col, cfg.classify_col) if c]]))
    layout.require_columns(str(cfg.data), dataset.schema, cols,
                           "set --image-col / --text-col (and the split, match or class column)",
                           image_col=image_col)
    imgs, txts, match, labels, skipped, n = [], [], [], [], 0, 0
    for rb in dataset.to_batches(columns=cols, batch_size=cfg.batch_size):
        d = rb.to_pydict()
        texts = [t if isinstance(t, str) else "" for t in d[cfg.text_col]]
        keep = selection.mask(texts, d.get(selection.split_col) if selection.split_col else None)
        idx = np.flatnonzero(keep)
        if cfg.max_rows is not None:
            idx = idx[: max(0, cfg.max_rows - n)]
        if len(idx) == 0:
            if cfg.max_rows is not None and n >= cfg.max_rows:
                break
            continue
        emb, ok = _embed_images_skipping(embedder, [d[image_col][i] for i in idx])
        skipped += int((~ok).sum())
        idx = idx[ok]
        n += len(idx)
        imgs.append(emb)
        txts.append(embedder.embed_texts([texts[i] for i in idx]))
        if cfg.match_col:
            match.extend(d[cfg.match_col][i] for i in idx)
        if cfg.classify_col:
            labels.extend(d[cfg.classify_col][i] for i in idx)
    if n == 0:
        raise ValueError(f"no evaluable rows in {cfg.data}")
    img, txt = np.concatenate(imgs), np.concatenate(txts)
    out = retrieval_metrics(img, txt, match if cfg.match_col else None)
    out["skipped_images"] = skipped
    if skipped:
        log.warning("eval: skipped %d undecodable image(s)", skipped)
    if cfg.classify_col:
        out["zero_shot"] = zero_shot_classify(embedder, img, labels, cfg.templates)
    return out
