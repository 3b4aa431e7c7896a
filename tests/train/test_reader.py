"""The window reader (real local Ray): one rank's stream reads every row of its epoch once, in
the deterministic order, and the ranks share nothing."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from align_ray.train import ingest, reader
from align_ray.train.order import DataOrder


def test_read_windows_stream_every_row_once_per_epoch(ray_cluster, tmp_path):
    files = []
    for f in range(3):
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.table({"k": [f * 100 + i for i in range(10)], "text": ["t"] * 10}), path,
                       row_group_size=4)
        files.append(str(path))
    fs = pafs.LocalFileSystem()
    assert ingest.file_rows(fs, files) == [10, 10, 10] and ingest.count_rows(fs, files) == 30
    order = DataOrder([10, 10, 10], seed=0, world=2, window_rows=8)
    seen = {}
    for rank in range(2):
        rows = sum(order.epoch_rows(e, rank) for e in range(2))
        items = order.windows(rank, 0, 0, rows)
        for it in items:
            it["path"] = [files[f] for f in it["file"]]
        assert {it["epoch"] for it in items} == {0, 1}
        ds = ray_cluster.data.from_items(items).map_batches(
            reader.read_windows, batch_size=1, batch_format="numpy",
            fn_kwargs=dict(filesystem=fs, columns=["k"], seed=0, rank=rank, rows_per_block=3))
        ds.context.execution_options.preserve_order = True  # as RankStream runs it
        got = [(int(e), int(o), int(k)) for b in ds.iter_batches(batch_size=7)
               for e, o, k in zip(b["pos_epoch"], b["pos_offset"], b["k"])]
        # positions run 0, 1, 2, ... within each epoch: the stream order
        for e in (0, 1):
            assert [o for ep, o, _ in got if ep == e] == list(range(order.epoch_rows(e, rank)))
        seen[rank] = got
        src = order.source_files(rank, 0, 0, len(got))  # the metadata-only view agrees
        assert [k // 100 for _, _, k in got] == src.tolist()
    for e in (0, 1):
        keys = [k for r in (0, 1) for ep, _, k in seen[r] if ep == e]
        assert sorted(keys) == [f * 100 + i for f in range(3) for i in range(10)]  # once each
