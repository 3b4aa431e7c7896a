"""The writer of one download shard (or one ``--retry-failed`` pass over it), in the stage
layout that :mod:`align_ray.layout` defines.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# Layout is re-exported: the downloader and benchmarks import it from here
from align_ray.layout import DROPPED_FIELDS, SAMPLE_FIELDS, Layout, schema  # noqa: F401


def write_marker(layout: Layout, shard: str, info: dict) -> None:
    layout.write_marker(shard, info)


def read_marker(layout: Layout, shard: str) -> dict:
    return layout.read_marker(shard)


@dataclass
class ShardResult:
    """Rows of one shard (or one retry pass over it), column-wise."""
    samples: dict[str, list]
    dropped: dict[str, list]
    extra_types: dict[str, pa.DataType]


def sample_table(res: ShardResult) -> pa.Table:
    return pa.table(res.samples, schema=schema(SAMPLE_FIELDS, res.extra_types))


def dropped_table(res: ShardResult) -> pa.Table:
    return pa.table(res.dropped, schema=schema(DROPPED_FIELDS, res.extra_types))


def write_part(layout: Layout, name: str, res: ShardResult, *, write_parquet: bool,
               write_webdataset: bool) -> list[str]:
    """Write the samples and the dropped rows of one shard part; returns the sample file names."""
    parts = layout.write_samples(name, sample_table(res), parquet=write_parquet,
                                 webdataset=write_webdataset)
    layout.write_dropped(name, dropped_table(res))
    return parts
