"""ALIGN's global frequency counts as a distributed Ray Data plan (no driver collect, no
materialised group per key).

``count_distinct(ds, key, other)`` = for every ``key``, the number of distinct ``other`` values:
texts per image (key=sha256, other=text_hash) and images per text (key=text_hash,
other=sha256).  Plan: dedup (key, other) inside each block with pyarrow (cheap, shrinks the
shuffle), hash-shuffle the pairs to dedup them globally, count per key inside each block, then
hash-shuffle the partial counts and sum them.  Only counters and hashes move: a text shared by
a million rows is a million small pairs spread over partitions, never one in-memory group.
"""

from __future__ import annotations

import pyarrow as pa
import ray.data
from ray.data.aggregate import Sum
from ray.data.expressions import col


def _distinct_in_block(batch: pa.Table, key: str, other: str) -> pa.Table:
    return batch.select([key, other]).group_by([key, other]).aggregate([])


def _count_in_block(batch: pa.Table, key: str, other: str) -> pa.Table:
    counted = batch.group_by(key).aggregate([(other, "count")])
    return counted.rename_columns([key if c == key else "n" for c in counted.column_names])


def count_distinct(ds: ray.data.Dataset, key: str, other: str,
                   num_partitions: int = 16) -> ray.data.Dataset:
    """Dataset of (key, n): the number of distinct ``other`` values seen with each ``key``."""
    pairs = ds.map_batches(_distinct_in_block, fn_kwargs={"key": key, "other": other},
                           batch_format="pyarrow", batch_size=None)
    distinct = pairs.groupby([key, other], num_partitions=num_partitions).count()
    partial = distinct.map_batches(_count_in_block, fn_kwargs={"key": key, "other": other},
                                   batch_format="pyarrow", batch_size=None)
    totals = partial.groupby(key, num_partitions=num_partitions).aggregate(Sum("n", alias_name="n"))
    return totals


def over_limit(counts: ray.data.Dataset, key: str, limit: int) -> ray.data.Dataset:
    """Keys whose distinct count exceeds ``limit`` (ALIGN: > 1000 texts, > 10 images)."""
    return counts.filter(expr=col("n") > limit).select_columns([key])
