"""ALIGN's global frequency counts as distributed Ray Data plans (no driver collect, no
materialised group per key).

Every count here is "pre-aggregate inside each block with pyarrow, then hash-shuffle the
partial results and combine them": only counters and hashes move, so a text shared by a
million rows is a million small pairs spread over partitions (and usually already summed
inside their blocks), never one in-memory group.

* :func:`pair_table`: one row per distinct (image, text) pair: how many rows carry it and the
  smallest row key (the survivor when exact duplicates collapse);
* :func:`per_key`: for each image, the distinct texts it has (and rows); for each text, the
  distinct images;
* :func:`count_distinct`: both in one call (used by the tests and the benchmark).
"""

from __future__ import annotations

import pyarrow as pa
import ray.data
from ray.data.aggregate import Min, Sum
from ray.data.expressions import col


def _pairs_in_block(batch: pa.Table, img: str, txt: str, key: str | None) -> pa.Table:
    aggs = [(img, "count")] + ([(key, "min")] if key else [])
    out = batch.group_by([img, txt], use_threads=False).aggregate(aggs)
    names = {f"{img}_count": "rows", f"{key}_min": "first_key"}
    return out.rename_columns([names.get(c, c) for c in out.column_names])


def pair_table(ds: ray.data.Dataset, img: str, txt: str, num_partitions: int,
               key: str | None = None) -> ray.data.Dataset:
    """(img, txt, rows[, first_key]) for every distinct (img, txt) pair."""
    partial = ds.map_batches(_pairs_in_block, fn_kwargs={"img": img, "txt": txt, "key": key},
                             batch_format="pyarrow", batch_size=None)
    aggs = [Sum("rows", alias_name="rows")]
    if key:
        aggs.append(Min("first_key", alias_name="first_key"))
    return partial.groupby([img, txt], num_partitions=num_partitions).aggregate(*aggs)


def _per_key_in_block(batch: pa.Table, key: str) -> pa.Table:
    out = batch.group_by(key, use_threads=False).aggregate([("rows", "count"), ("rows", "sum")])
    return out.rename_columns([{"rows_count": "n", "rows_sum": "rows"}.get(c, c)
                               for c in out.column_names])


def per_key(pairs: ray.data.Dataset, key: str, num_partitions: int) -> ray.data.Dataset:
    """(key, n, rows): distinct partners of each key (pairs are distinct) and its rows."""
    partial = pairs.map_batches(_per_key_in_block, fn_kwargs={"key": key},
                                batch_format="pyarrow", batch_size=None)
    return partial.groupby(key, num_partitions=num_partitions).aggregate(
        Sum("n", alias_name="n"), Sum("rows", alias_name="rows"))


def count_distinct(ds: ray.data.Dataset, key: str, other: str,
                   num_partitions: int = 16) -> ray.data.Dataset:
    """Dataset of (key, n, rows): the number of distinct ``other`` values seen with each ``key``."""
    return per_key(pair_table(ds, key, other, num_partitions), key, num_partitions)


def over_limit(counts: ray.data.Dataset, key: str, limit: int) -> ray.data.Dataset:
    """Keys whose distinct count exceeds ``limit`` (ALIGN: > 1000 texts, > 10 images)."""
    return counts.filter(expr=col("n") > limit).select_columns([key])
