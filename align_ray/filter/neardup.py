"""Near-duplicate images across the whole corpus (rule ``near_duplicate``): pHash Hamming
distance <= d between two distinct images (``near_dup_distance: d``; off until set).

Which one survives: every image (``img_id``: sha256 or pHash, as ``image_identity`` says) has a
first key, the smallest key of its rows.  An image is dropped, all its rows, when another image
within d bits has a smaller first key.  This is order-free and needs no pass per cluster: every
image is judged against all its neighbours at once.  In a chain a ~ b ~ c where a and c are
more than d apart, c is still dropped (b is earlier and close), so chains collapse to their
earliest image; SemDeDup's greedy "close to a *kept* pair" would keep c.

The search is the pigeonhole rule on bands, as Ray tasks (:mod:`align_ray.filter.shuffle`):

    E = per distinct image: pHash, first key                          [aggregate of the rows]
    B = E x (d + 1) bands: the band's bits, tagged with its number     [map]
    C = per band bucket: every pair in it compared exactly             [map_groups, one task
        (popcount of the xor <= d); per image: the smallest first        per partition]
        key among its matches, and the candidates it was compared with
    N = per image: min over its bands                                  [aggregate]

Two hashes at most d bits apart differ in at most d of the d + 1 bands, so they are equal in at
least one and meet in that band's bucket: no pair within d is missed, and every candidate is
checked exactly, so none is matched wrongly.  The cost is the pairs inside buckets.  For
uniformly spread hashes a band of w = 64 / (d + 1) bits puts N / 2^w images in a bucket, so the
comparisons are about (d + 1) x N^2 / 2^(w + 1); real pHashes are skewed (blank and
single-colour images share a few values), which the candidate counts show: per row in the
``nd_candidates`` column of the output (kept and dropped rows), per image (mean, max) in
``stats.json`` and the report.  README "Stage 2" has the figures for 1.8 B images.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data

from align_ray.filter.shuffle import Agg, aggregate, map_groups

RULE = "near_duplicate"
CANDIDATES = "nd_candidates"   # the column: pHashes compared with this row's image
_CELLS = 1 << 24  # pairs compared at once inside a bucket: bounds a task's temporaries (~128 MB each)


def bands(d: int) -> list[tuple[int, int]]:
    """(shift, width) of the d + 1 bands that cover the 64 bits (widths differ by at most 1)."""
    b = d + 1
    widths = [64 // b + (1 if i < 64 % b else 0) for i in range(b)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int).tolist()
    return list(zip(shifts, widths))


def _band_keys(block: pa.Table, d: int) -> pa.Table:
    """Each image once per band, keyed by (band number, band bits) packed into one uint64."""
    ph = np.asarray(block.column("phash").to_numpy(zero_copy_only=False), np.uint64)
    parts = []
    for i, (shift, width) in enumerate(bands(d)):
        bits = (ph >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        # with one band (d = 0) the key is the whole hash; otherwise width <= 32 leaves room
        key = bits if width == 64 else (np.uint64(i) << np.uint64(32)) | bits
        parts.append(pa.table({"band_key": pa.array(key, pa.uint64()),
                               "img_id": block.column("img_id"), "phash": block.column("phash"),
                               "first_key": block.column("first_key")}))
    return pa.concat_tables(parts)


def _bucket(group: pa.Table, d: int) -> pa.Table:
    """One bucket: for each image, its candidates (the others in the bucket) and the smallest
    first key among those within d bits that come before it (null if none)."""
    n = group.num_rows
    img = group.column("img_id")
    first = np.asarray(group.column("first_key").to_numpy(zero_copy_only=False), np.int64)
    near = np.full(n, np.iinfo(np.int64).max, np.int64)
    if n > 1:
        ph = np.asarray(group.column("phash").to_numpy(zero_copy_only=False), np.uint64)
        step = max(1, _CELLS // n)
        for s in range(0, n, step):
            close = np.bitwise_count(ph[s:s + step, None] ^ ph[None, :]) <= d
            earlier = first[None, :] < first[s:s + step, None]   # never itself
            near[s:s + step] = np.where(close & earlier, first[None, :],
                                        np.iinfo(np.int64).max).min(axis=1)
    found = near != np.iinfo(np.int64).max
    return pa.table({"img_id": img, "nd_candidates": pa.array(np.full(n, n - 1, np.int64)),
                     "nd_first": pa.array(near, pa.int64(), mask=~found)})


def matches(rows: ray.data.Dataset, d: int, num_partitions: int) -> ray.data.Dataset:
    """N: (img_id, nd_candidates, nd_first) for every distinct image of ``rows`` (which has
    img_id, phash, key_id); nd_first is null for an image that stays."""
    images = aggregate(rows, ["img_id"], [Agg("phash", "min", "phash"),
                                          Agg("first_key", "min", "key_id")], num_partitions)
    keyed = images.map_batches(_band_keys, fn_kwargs={"d": d}, batch_format="pyarrow",
                               batch_size=None)
    buckets = map_groups(keyed, "band_key", _bucket, num_partitions, {"d": d})
    per_band = ray.data.from_arrow_refs([_typed.remote(r) for r in buckets])
    return aggregate(per_band, ["img_id"], [Agg("nd_candidates", "sum", "nd_candidates"),
                                            Agg("nd_first", "min", "nd_first")], num_partitions)


@ray.remote
def _typed(table: pa.Table) -> pa.Table:
    """map_groups gives a column-less table for a partition without buckets."""
    if table.num_columns:
        return table
    return pa.table({"img_id": pa.array([], pa.uint64()), "nd_candidates": pa.array([], pa.int64()),
                     "nd_first": pa.array([], pa.int64())})


def summary(found: ray.data.Dataset, d: int) -> dict:
    """stats.json's ``near_duplicate``: images, the candidate comparisons per image (the cost of
    the band search) and the images that have an earlier near-duplicate."""
    parts = found.map_batches(_block_summary, batch_format="pyarrow", batch_size=None).take_all()
    images = sum(p["images"] for p in parts)
    cands = sum(p["candidates"] for p in parts)
    return {"distance": d, "bands": [w for _, w in bands(d)], "images": images,
            "images_with_an_earlier_near_duplicate": sum(p["matched"] for p in parts),
            "candidates_per_image": {"mean": round(cands / images, 3) if images else 0.0,
                                     "max": max((p["max"] for p in parts), default=0)}}


def _block_summary(block: pa.Table) -> pa.Table:
    c = np.asarray(block.column("nd_candidates").to_numpy(zero_copy_only=False), np.int64)
    return pa.table({"images": [len(c)], "candidates": [int(c.sum())],
                     "max": [int(c.max()) if len(c) else 0],
                     "matched": [len(c) - block.column("nd_first").null_count]})
