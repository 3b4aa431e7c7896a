"""The training stream's reader: one shuffle window's rows out of parquet, in the window's
seeded order, with their stream positions (``train/ingest.py`` runs it as the first Ray Data
map of each rank's pipeline; ``train/order.py`` says which rows a window holds).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow.fs as pafs

from align_ray.train.order import aug_seeds, window_order
from align_ray.train.selection import Selection


def read_rows(fs: pafs.FileSystem, paths: Any, files: Any, starts: Any, lens: Any,
              columns: list[str], cache: dict) -> Any:
    """The rows of a window's slices, concatenated in slice order: only the row groups the
    slices overlap are read, each once per read task (``cache``: path -> row-group starts and
    the groups read so far); one vectorised ``take`` then gathers the rows (a one-row-slice
    window, which lists every row of a small dataset, costs one read of each file, not one per
    row, and the draws of one task share it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = np.asarray(files, np.int64)
    starts, lens = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
    # every row of the window: (file, row in file), in slice order
    row_file = np.repeat(files, lens)
    first = np.repeat(np.cumsum(lens) - lens, lens)
    row_at = np.repeat(starts, lens) + (np.arange(int(lens.sum()), dtype=np.int64) - first)
    tables, index = [], np.zeros(len(row_at), np.int64)
    base = 0
    for f in dict.fromkeys(files.tolist()):  # files in first-use order
        path = str(paths[int(np.flatnonzero(files == f)[0])])
        sel = np.flatnonzero(row_file == f)
        pf = None  # opened at most once per file and task: footer and row groups together
        try:
            if path not in cache:
                pf = pq.ParquetFile(fs.open_input_file(path))
                md = pf.metadata
                cache[path] = (np.concatenate([[0], np.cumsum(
                    [md.row_group(i).num_rows for i in range(md.num_row_groups)])]), {})
            rg, groups = cache[path]
            group = np.searchsorted(rg, row_at[sel], side="right") - 1
            need = np.unique(group)
            for g in (int(g) for g in need if int(g) not in groups):
                pf = pf or pq.ParquetFile(fs.open_input_file(path))
                groups[g] = pf.read_row_group(g, columns=columns)
        finally:
            if pf is not None:
                pf.close(force=True)  # the handle opened here, not by ParquetFile
        table = pa.concat_tables([groups[int(g)] for g in need])
        # a row's place in ``table``: its group's place among the groups read + row in group
        sizes = rg[need + 1] - rg[need]
        at = np.searchsorted(need, group)
        index[sel] = base + (np.cumsum(sizes) - sizes)[at] + row_at[sel] - rg[group]
        base += table.num_rows
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive"), index


def read_windows(batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem,
                 columns: list[str], seed: int, rank: int, rows_per_block: int,
                 take: int = 0, text_col: str | None = None,
                 selection: Selection | None = None) -> Iterator[Any]:
    """``map_batches`` generator: each read item (one shuffle window, DataOrder.windows) -> its
    rows in the window's seeded order, from its ``skip``-th on, with their stream position
    (``pos_epoch``, ``pos_offset``), source file index (``src_file``) and ``aug_seed``.
    ``take`` > 0 (a resampled draw, DataOrder.take): the window ends after its ``take``-th row
    that ``selection`` keeps, so a draw is one step's rows of the rank."""
    import pyarrow as pa

    cache: dict = {}  # row groups read, shared by the windows of this task
    for j in range(len(batch["epoch"])):
        epoch, w = int(batch["epoch"][j]), int(batch["window"][j])
        base, skip = int(batch["base"][j]), int(batch["skip"][j])
        table, index = read_rows(filesystem, batch["path"][j], batch["file"][j],
                                 batch["start"][j], batch["len"][j], columns, cache)
        src_all = np.repeat(np.asarray(batch["file"][j], np.int32),
                            np.asarray(batch["len"][j], np.int64))
        order = window_order(seed, epoch, rank, w, len(index))
        end = len(order)
        if take:
            idx = pa.array(index[order])
            texts = [t if isinstance(t, str) else ""
                     for t in table.column(text_col).take(idx).to_pylist()]
            split = (table.column(selection.split_col).take(idx).to_pylist()
                     if selection.split_col else None)
            kept = np.flatnonzero(selection.mask(texts, split))
            end = int(kept[take - 1]) + 1 if len(kept) >= take else end
        pos = np.arange(base, base + len(order), dtype=np.int64)
        for k in range(skip, end, rows_per_block):
            rows = order[k:min(k + rows_per_block, end)]
            p = pos[k:k + len(rows)]
            yield (table.take(pa.array(index[rows]))
                   .append_column("pos_epoch", pa.array(np.full(len(rows), epoch, np.int64)))
                   .append_column("pos_offset", pa.array(p))
                   .append_column("src_file", pa.array(src_all[rows]))
                   .append_column("aug_seed", pa.array(aug_seeds(seed, rank, epoch, p))))
