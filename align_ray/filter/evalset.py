"""Near-duplicates of evaluation images (ALIGN removed them so zero-shot numbers are honest).

Eval sets are small (thousands to ~100 k images), so their perceptual hashes are computed on
the driver once and broadcast; every training row's pHash is then compared with all of them,
vectorised (XOR + popcount over 64-bit words), in chunks that bound memory.  Cost is
O(rows x eval images) popcounts: 13 ns each measured on a busy 2-core box, i.e. ~1.3 ms per
row for a 100 k-image eval set (exact; see the README for the cluster-scale cost).
The pHash is the download stage's (whole picture, before any crop), so a re-encoded, resized or
re-cropped-by-the-resizer copy of an eval image lands within a few bits of it.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from align_ray import layout
from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.resizer import process_image

log = logging.getLogger("align_ray.filter")
_IMAGE_COLS = ("jpg", "image", "img", "png", "webp")
_HASH_CFG = DataConfig(image_size=256, resize_mode="keep_ratio")


def _image_column(schema: pa.Schema, wanted: str, path: str) -> str:
    if wanted:
        if wanted not in schema.names:
            raise ValueError(f"eval set {path}: no column {wanted!r} (columns: {schema.names})")
        return wanted
    for name in _IMAGE_COLS:
        if name in schema.names:
            return name
    raise ValueError(f"eval set {path}: no image column; looked for {list(_IMAGE_COLS)} "
                     f"(set eval_image_col); columns: {schema.names}")


def image_phash(data: bytes) -> int:
    """pHash of an image exactly as the download stage computes it for training rows."""
    return process_image(data, _HASH_CFG).phash


def load_hashes(paths: list[str], image_col: str = "") -> np.ndarray:
    """uint64 pHashes of every image in the eval sets (a stage output dir, parquet files,
    folders or globs, local or s3://).

    An eval image that cannot be decoded is an error: silently skipping it would let its
    near-duplicates into training."""
    hashes: list[int] = []
    for uri in paths:
        fs, files = layout.parquet_files(uri)   # a stage DIR reads its DIR/parquet
        for path in files:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                column = _image_column(pf.schema_arrow, image_col, path)
                for batch in pf.iter_batches(columns=[column], batch_size=1024):
                    for i, data in enumerate(batch.column(0).to_pylist()):
                        try:
                            hashes.append(image_phash(data))
                        except Drop as e:
                            raise ValueError(f"eval set {path}: image {i} is unreadable "
                                             f"({e.reason}: {e.detail})") from None
    if paths and not hashes:
        raise ValueError(f"eval sets {paths}: no images found")
    log.info("eval sets: %d image hashes", len(hashes))
    return np.unique(np.asarray(hashes, dtype=np.uint64))


def min_distance(phashes: np.ndarray, eval_hashes: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For every pHash, the Hamming distance to the nearest eval hash (64 if none)."""
    out = np.full(len(phashes), 64, dtype=np.int16)
    if len(eval_hashes) == 0 or len(phashes) == 0:
        return out
    ev = eval_hashes.astype(np.uint64)[None, :]
    step = max(1, (chunk * 4096) // max(1, len(eval_hashes)))
    for s in range(0, len(phashes), step):
        x = phashes[s:s + step].astype(np.uint64)[:, None] ^ ev
        out[s:s + step] = np.bitwise_count(x).min(axis=1)
    return out
