"""The exact global top-k of ``pair_score`` over a distributed dataset (the
``score_keep_fraction`` rule), without collecting the scores on one machine.

Rows are ordered best first by (pair_score descending, key ascending): the key breaks ties, so
exactly k rows are kept however many share the score at the cut.  Each row maps to a 96-bit
unsigned number that sorts the same way (32 bits of the order-flipped float, then 64 of the
key).  A radix selection finds the k-th smallest: one pass per 16-bit digit, each a per-block
histogram of that digit among the rows that share the digits chosen so far (65,536 counters
per block, summed on the driver); once the chosen bucket holds at most ``collect_limit`` rows
they are collected and sorted.  Usually two passes: one histogram and one small collect.
A missing or NaN score ranks below every real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray.data

BITS, DIGIT = 96, 16
RADIX = 1 << DIGIT


def order_words(score: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi uint32, lo uint64): ascending (hi, lo) = descending score, then ascending key."""
    s = np.asarray(score, np.float32).copy()
    s[np.isnan(s)] = -np.inf
    bits = s.view(np.uint32)
    sortable = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    hi = (~sortable).astype(np.uint32)                       # higher score -> smaller hi
    lo = np.asarray(key, np.int64).view(np.uint64) ^ np.uint64(1 << 63)  # signed order kept
    return hi, lo


def _words(batch: pa.Table, score_col: str, key_col: str):
    score = batch.column(score_col).to_numpy(zero_copy_only=False).astype(np.float32)
    key = batch.column(key_col).to_numpy(zero_copy_only=False)
    return order_words(score, key)


def _match(hi: np.ndarray, lo: np.ndarray, bits: int, prefix: int) -> np.ndarray:
    """Rows whose top ``bits`` bits (of the 96) equal ``prefix``."""
    if bits == 0:
        return np.ones(len(hi), bool)
    if bits <= 32:
        return (hi >> np.uint32(32 - bits)) == np.uint32(prefix)
    low_bits = bits - 32
    return ((hi == np.uint32(prefix >> low_bits))
            & ((lo >> np.uint64(64 - low_bits)) == np.uint64(prefix & ((1 << low_bits) - 1))))


def _digit(hi: np.ndarray, lo: np.ndarray, bits: int) -> np.ndarray:
    """The 16-bit digit that starts ``bits`` bits below the top."""
    if bits < 32:
        return ((hi >> np.uint32(32 - bits - DIGIT)) & np.uint32(RADIX - 1)).astype(np.int64)
    return ((lo >> np.uint64(64 - (bits - 32) - DIGIT)) & np.uint64(RADIX - 1)).astype(np.int64)


def _histogram(batch: pa.Table, score_col: str, key_col: str, bits: int, prefix: int) -> pa.Table:
    hi, lo = _words(batch, score_col, key_col)
    m = _match(hi, lo, bits, prefix)
    counts = np.bincount(_digit(hi[m], lo[m], bits), minlength=RADIX)
    nz = np.flatnonzero(counts)   # sparse: a block touches few buckets below the top digit
    return pa.table({"bin": pa.array(nz, pa.int64()), "n": pa.array(counts[nz], pa.int64())})


def _collect(batch: pa.Table, score_col: str, key_col: str, bits: int, prefix: int) -> pa.Table:
    hi, lo = _words(batch, score_col, key_col)
    m = _match(hi, lo, bits, prefix)
    return pa.table({"hi": pa.array(hi[m], pa.uint32()), "lo": pa.array(lo[m], pa.uint64())})


@dataclass
class Cut:
    """Keep a row iff its (hi, lo) <= (hi, lo) of the cut; ``hi`` None: keep none."""
    keep: int
    rows: int
    hi: int | None
    lo: int | None
    score: float | None      # the k-th best score (for reports)
    passes: int

    def keeps(self, score: np.ndarray, key: np.ndarray) -> np.ndarray:
        if self.hi is None:
            return np.zeros(len(score), bool)
        hi, lo = order_words(score, key)
        chi, clo = np.uint32(self.hi), np.uint64(self.lo)
        return (hi < chi) | ((hi == chi) & (lo <= clo))


def _score_of(hi: int) -> float:
    sortable = np.uint32(~np.uint32(hi))
    bits = sortable & np.uint32(0x7FFFFFFF) if sortable & np.uint32(0x80000000) else ~sortable
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def top_k_cut(ds: ray.data.Dataset, k: int, rows: int, score_col: str = "pair_score",
              key_col: str = "key_id", collect_limit: int = 1 << 20) -> Cut:
    """The cut that keeps exactly the ``k`` best of the ``rows`` rows of ``ds``."""
    if k <= 0:
        return Cut(0, rows, None, None, None, 0)
    k = min(k, rows)
    ds = ds.select_columns([score_col, key_col])
    kw = {"score_col": score_col, "key_col": key_col}
    bits, prefix, rank, in_bucket, passes = 0, 0, k, rows, 0
    while in_bucket > collect_limit and bits < BITS:
        counts = np.zeros(RADIX, np.int64)
        for b in ds.map_batches(_histogram, fn_kwargs={**kw, "bits": bits, "prefix": prefix},
                                batch_format="pyarrow", batch_size=None).iter_batches(
                                    batch_format="pyarrow", batch_size=None):
            np.add.at(counts, b.column("bin").to_numpy(), b.column("n").to_numpy())
        passes += 1
        cum = np.cumsum(counts)
        d = int(np.searchsorted(cum, rank))          # first bucket reaching the rank
        rank -= int(cum[d - 1]) if d else 0
        in_bucket = int(counts[d])
        prefix, bits = (prefix << DIGIT) | d, bits + DIGIT
    found = [b for b in ds.map_batches(_collect, fn_kwargs={**kw, "bits": bits, "prefix": prefix},
                                       batch_format="pyarrow", batch_size=None).iter_batches(
                                           batch_format="pyarrow", batch_size=None)]
    passes += 1
    hi = np.concatenate([b.column("hi").to_numpy() for b in found]).astype(np.uint32)
    lo = np.concatenate([b.column("lo").to_numpy() for b in found]).astype(np.uint64)
    order = np.lexsort((lo, hi))
    j = order[rank - 1]
    return Cut(k, rows, int(hi[j]), int(lo[j]), _score_of(int(hi[j])), passes)
