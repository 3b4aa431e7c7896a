"""Hash-partitioned aggregate and join on plain Ray tasks (map-side combine -> partition -> reduce).

Why not ``Dataset.groupby`` / ``Dataset.join``: in Ray Data 2.60 every hash-shuffle operator
starts its own pool of aggregator actors (a Python process each: ~4-5 s per operator on a
2-core box), and the filter plan has about a dozen of them, so fixed costs dwarfed the work
(measured: counts 25x a single-process pyarrow baseline at 4 M rows, all of it start-up).  The
sort-based task shuffle is worse (149 s for the same counts).  This module is the classic
two-stage Ray shuffle instead, on worker processes Ray already has:

* **map** (one task per input block): pre-aggregate the block with pyarrow (so a key that is on
  a million rows leaves the block as one row), hash the key columns, and return one table per
  partition (``num_returns=num_partitions``: the pieces stay in the object store, spilled to
  disk under memory pressure; the driver holds only their refs, never rows);
* **reduce** (one task per partition): concatenate that partition's pieces and finish the
  aggregation (sums of counts, mins of mins) or join the two sides with pyarrow.

Inputs and outputs are materialised :class:`ray.data.Dataset` s (``to_arrow_refs`` /
``from_arrow_refs``), so the rest of the plan, the writer and the report use Ray Data as before.

Scale: intermediate objects = map blocks x partitions.  Partitions are sized to ~1 M distinct
keys (``pipeline.partitions``) and map blocks to the input's blocks (read_parquet: ~128 MiB
each), so 1.8 B metadata rows (~90 GB) are ~700 blocks x ~1,800 partitions = 1.3 M pieces of a
few KB (most of them small enough to be inlined in the owner's memory store), and each reducer
holds one partition (~50 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

_MERGE = {"count": "sum", "sum": "sum", "min": "min", "max": "max"}
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Agg:
    """``name`` = ``fn``(``column``) per group; ``fn`` in count (rows when column is None), sum,
    min, max.  Each is computed per block first and merged in the reducer (count -> sum)."""

    name: str
    fn: str
    column: str | None = None

    def __post_init__(self):
        if self.fn not in _MERGE:
            raise ValueError(f"unsupported aggregation {self.fn!r} (one of {sorted(_MERGE)})")


def _as_u64(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_integer(col.type):
        arr = col.to_numpy() if isinstance(col, pa.Array) else col.combine_chunks().to_numpy(
            zero_copy_only=False)
        return np.asarray(arr).astype(np.uint64, copy=False)
    # strings and anything else: pandas' vectorised 64-bit hash (stable across processes)
    return pd.util.hash_array(np.asarray(col.to_pylist(), dtype=object), categorize=False)


def partition_ids(table: pa.Table, keys: list[str], n: int) -> np.ndarray:
    """The partition (0..n-1) of every row: splitmix64 of the key columns, mixed."""
    h = np.zeros(table.num_rows, np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            z = h ^ _as_u64(table.column(k))
            z = (z ^ (z >> np.uint64(30))) * _C1
            z = (z ^ (z >> np.uint64(27))) * _C2
            h = z ^ (z >> np.uint64(31))
    return (h % np.uint64(n)).astype(np.int64)


def split(table: pa.Table, keys: list[str], n: int) -> list[pa.Table]:
    """``table`` cut into ``n`` tables by :func:`partition_ids` (empty ones keep the schema)."""
    if n == 1:
        return [table]
    pid = partition_ids(table, keys, n)
    order = np.argsort(pid, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(pid, minlength=n))])
    ordered = table.take(pa.array(order))
    return [ordered.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


def _group(table: pa.Table, keys: list[str], spec: list[tuple[str, str, str | None]]) -> pa.Table:
    """group_by(keys) with ``spec`` = [(out name, fn, column)]; column None = count rows."""
    aggs, names = [], {}
    for name, fn, column in spec:
        if column is None:
            aggs.append(([], "count_all"))
            names["count_all"] = name
        else:
            aggs.append((column, fn))
            names[f"{column}_{fn}"] = name
    out = table.group_by(keys, use_threads=False).aggregate(aggs)
    return out.rename_columns([names.get(c, c) for c in out.column_names]).select(
        keys + [name for name, _, _ in spec])


def _prep(block: pa.Table, schema: pa.Schema, where: pc.Expression | None,
          columns: list[str] | None) -> pa.Table:
    """Empty blocks may come without columns (Ray Data drops their schema): give them the
    dataset's; then the optional row filter and column selection."""
    table = schema.empty_table() if block.num_rows == 0 else block
    if where is not None:
        table = table.filter(where)
    return table.select(columns) if columns is not None else table


def _combine(block: pa.Table, schema: pa.Schema, where, keys: list[str],
             aggs: tuple[Agg, ...], n: int):
    table = _prep(block, schema, where, None)
    partial = _group(table, keys, [(a.name, a.fn, a.column) for a in aggs])
    parts = split(partial, keys, n)
    return parts[0] if n == 1 else tuple(parts)


def _finish(keys: list[str], aggs: tuple[Agg, ...], *parts: pa.Table) -> pa.Table:
    table = pa.concat_tables(parts, promote_options="permissive")
    return _group(table, keys, [(a.name, _MERGE[a.fn], a.name) for a in aggs])


def _cut(block: pa.Table, schema: pa.Schema, where, columns, keys: list[str], n: int):
    parts = split(_prep(block, schema, where, columns), keys, n)
    return parts[0] if n == 1 else tuple(parts)


def _join(on: list[str], join_type: str, n_left: int, drop: list[str], *parts: pa.Table) -> pa.Table:
    left = pa.concat_tables(parts[:n_left], promote_options="permissive")
    right = pa.concat_tables(parts[n_left:], promote_options="permissive")
    out = left.join(right, keys=on, join_type=join_type, use_threads=False, coalesce_keys=True)
    return out.drop_columns([c for c in drop if c in out.column_names])


def _apply_groups(key: str, fn, fn_kwargs: dict, *parts: pa.Table) -> pa.Table:
    table = pa.concat_tables(parts, promote_options="permissive")
    if table.num_rows == 0:
        return pa.table({})
    table = table.sort_by(key)
    values = table.column(key).combine_chunks()
    starts = np.flatnonzero(np.concatenate(
        [[True], pc.not_equal(values[1:], values[:-1]).to_numpy(zero_copy_only=False)]))
    ends = np.append(starts[1:], table.num_rows)
    return pa.concat_tables([fn(table.slice(a, b - a), **fn_kwargs) for a, b in zip(starts, ends)],
                            promote_options="permissive")


_combine_task, _finish_task = ray.remote(_combine), ray.remote(_finish)
_cut_task, _join_task = ray.remote(_cut), ray.remote(_join)
_groups_task = ray.remote(_apply_groups)


def _blocks(ds: ray.data.Dataset) -> tuple[list, pa.Schema]:
    """The dataset's Arrow block refs and its schema, from the block metadata (materialising
    a lazy dataset first: ``schema()`` of a lazy one would fetch a block into the driver).
    Empty blocks may come without columns; map tasks substitute an empty table of this schema."""
    ds = ds.materialize()
    refs = list(ds.to_arrow_refs())
    schema = ds.schema()
    if schema is None:
        raise ValueError("dataset has no schema (no blocks with columns): nothing to shuffle")
    schema = schema.base_schema if hasattr(schema, "base_schema") else schema
    if not refs:
        refs = [ray.put(schema.empty_table())]
    return refs, schema


def _dataset(refs: list) -> ray.data.Dataset:
    return ray.data.from_arrow_refs(refs)


def aggregate(ds: ray.data.Dataset, keys: list[str], aggs: list[Agg], num_partitions: int,
              where: pc.Expression | None = None) -> ray.data.Dataset:
    """One row per distinct ``keys`` with ``aggs`` over the rows matching ``where`` (all by
    default), as a materialised dataset of ``num_partitions`` blocks (block i holds the keys
    that hash to i; every block has the full schema, even when empty)."""
    n, keys, aggs_t = max(1, int(num_partitions)), list(keys), tuple(aggs)
    combine = _combine_task.options(num_returns=n)
    refs, schema = _blocks(ds)
    pieces = [combine.remote(b, schema, where, keys, aggs_t, n) for b in refs]
    if n == 1:
        pieces = [[p] for p in pieces]
    return _dataset([_finish_task.remote(keys, aggs_t, *[p[i] for p in pieces]) for i in range(n)])


def join(left: ray.data.Dataset, right: ray.data.Dataset, on: list[str], join_type: str,
         num_partitions: int, left_columns: list[str] | None = None,
         right_where: pc.Expression | None = None, drop: list[str] = ()) -> ray.data.Dataset:
    """Hash join (``join_type``: pyarrow's "inner", "left outer", "left anti", ...): both sides
    cut by the hash of ``on``, then each partition joined by one task.  ``left_columns``
    selects the left side's columns and ``right_where`` filters the right side's rows before
    the cut; ``drop`` removes columns from the result (all inside the tasks, so an empty side
    keeps its schema)."""
    n, on = max(1, int(num_partitions)), list(on)
    cut = _cut_task.options(num_returns=n)
    sides = []
    for ds, where, cols in ((left, None, left_columns), (right, right_where, None)):
        refs, schema = _blocks(ds)
        pieces = [cut.remote(b, schema, where, cols, on, n) for b in refs]
        sides.append([[p] for p in pieces] if n == 1 else pieces)
    return _dataset([_join_task.remote(on, join_type, len(sides[0]), list(drop),
                                 *[p[i] for p in sides[0]], *[p[i] for p in sides[1]])
                     for i in range(n)])


def map_groups(ds: ray.data.Dataset, key: str, fn, num_partitions: int,
               fn_kwargs: dict | None = None) -> list:
    """``fn(group_table, **fn_kwargs) -> pa.Table`` once per distinct ``key`` (rows of one key
    always meet in one task).  Returns one ObjectRef per partition: the results of its groups
    concatenated (an empty, column-less table when no key hashed there)."""
    n = max(1, int(num_partitions))
    cut = _cut_task.options(num_returns=n)
    refs, schema = _blocks(ds)
    pieces = [cut.remote(b, schema, None, None, [key], n) for b in refs]
    if n == 1:
        pieces = [[p] for p in pieces]
    # one copy in the object store for all partitions (the writer's kwargs hold the shard list)
    kwargs = ray.put(fn_kwargs or {})
    return [_groups_task.remote(key, fn, kwargs, *[p[i] for p in pieces]) for i in range(n)]
