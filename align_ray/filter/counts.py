"""ALIGN's global frequency counts as distributed plans (no driver collect, no materialised
group per key).

Every count here is "pre-aggregate inside each block with pyarrow, then hash-partition the
partial results and combine them" (:mod:`align_ray.filter.shuffle`): only counters and hashes
move, so a text shared by a million rows is a million small pairs spread over partitions (and
usually already summed inside their blocks), never one in-memory group.

* :func:`pair_table`: one row per distinct (image, text) pair: how many rows carry it and the
  smallest row key (the survivor when exact duplicates collapse);
* :func:`per_key`: for each image, the distinct texts it has (and rows); for each text, the
  distinct images;
* :func:`count_distinct`: both in one call (used by the tests and the benchmark).
"""

from __future__ import annotations

import ray.data
from ray.data.expressions import col

from align_ray.filter.shuffle import Agg, aggregate


def pair_table(ds: ray.data.Dataset, img: str, txt: str, num_partitions: int,
               key: str | None = None) -> ray.data.Dataset:
    """(img, txt, rows[, first_key]) for every distinct (img, txt) pair."""
    aggs = [Agg("rows", "count")] + ([Agg("first_key", "min", key)] if key else [])
    return aggregate(ds, [img, txt], aggs, num_partitions)


def per_key(pairs: ray.data.Dataset, key: str, num_partitions: int, n: str = "n",
            rows: str = "rows") -> ray.data.Dataset:
    """(key, n, rows): distinct partners of each key (pairs are distinct) and its rows
    (output column names ``n`` and ``rows``)."""
    return aggregate(pairs, [key], [Agg(n, "count"), Agg(rows, "sum", "rows")], num_partitions)


def count_distinct(ds: ray.data.Dataset, key: str, other: str,
                   num_partitions: int = 16) -> ray.data.Dataset:
    """Dataset of (key, n, rows): the number of distinct ``other`` values seen with each ``key``."""
    return per_key(pair_table(ds, key, other, num_partitions), key, num_partitions)


def over_limit(counts: ray.data.Dataset, key: str, limit: int) -> ray.data.Dataset:
    """Keys whose distinct count exceeds ``limit`` (ALIGN: > 1000 texts, > 10 images)."""
    return counts.filter(expr=col("n") > limit).select_columns([key])
