"""Training ingest: several epochs streamed in one Ray Data execution (real local Ray)."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from align_ray.train import ingest
from align_ray.train.config import TrainConfig


def test_read_epochs_streams_every_row_once_per_epoch(ray_cluster, tmp_path):
    files = []
    for f in range(3):
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.table({"k": [f * 100 + i for i in range(10)], "text": ["t"] * 10}), path,
                       row_group_size=4)
        files.append(str(path))
    fs = pafs.LocalFileSystem()
    assert ingest.count_rows(fs, files) == 30
    ds = ingest.read_epochs(files, fs, ["k"], epochs=4, seed=0, rows_per_block=3)
    counts = Counter(int(k) for b in ds.iter_batches(batch_size=7) for k in b["k"])
    assert set(counts) == {f * 100 + i for f in range(3) for i in range(10)}
    assert set(counts.values()) == {4}  # read_parquet would have de-duplicated repeated paths


def test_auto_stream_epochs_covers_the_run_within_a_row_cap():
    auto = TrainConfig(data=["x"])
    assert ingest.auto_stream_epochs(auto, rows=1000, remaining_samples=64 * 400) == 32  # 1.25x
    assert ingest.auto_stream_epochs(auto, rows=10**9, remaining_samples=10**6) == 1
    assert ingest.auto_stream_epochs(auto, rows=10**6, remaining_samples=10**9) == 4  # row cap
    assert ingest.auto_stream_epochs(TrainConfig(data=["x"], stream_epochs=3), 10, 10**6) == 3
