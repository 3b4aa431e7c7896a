"""Training ingest (real local Ray): one rank's stream reads every row of its epoch once, in the
deterministic order, and the ranks share nothing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from align_ray.train import ingest


def test_read_windows_stream_every_row_once_per_epoch(ray_cluster, tmp_path):
    files = []
    for f in range(3):
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.table({"k": [f * 100 + i for i in range(10)], "text": ["t"] * 10}), path,
                       row_group_size=4)
        files.append(str(path))
    fs = pafs.LocalFileSystem()
    assert ingest.file_rows(fs, files) == [10, 10, 10] and ingest.count_rows(fs, files) == 30
    order = ingest.DataOrder([10, 10, 10], seed=0, world=2, window_rows=8)
    seen = {}
    for rank in range(2):
        rows = sum(order.epoch_rows(e, rank) for e in range(2))
        items = order.windows(rank, 0, 0, rows)
        for it in items:
            it["path"] = [files[f] for f in it["file"]]
        assert {it["epoch"] for it in items} == {0, 1}
        ds = ray_cluster.data.from_items(items).map_batches(
            ingest._read_windows, batch_size=1, batch_format="numpy",
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


def test_cross_fitting_folds_leave_out_one_caption_hash_fold_of_the_training_rows():
    from align_ray.train.config import TrainConfig
    from align_ray.train.ingest import caption_fold, selections

    texts = [f"caption {i}" for i in range(2000)]
    base = dict(data=["d"], output="o", val_fraction=0.2)
    (_, train), (_, val) = selections(TrainConfig(**base))
    held = val.mask(texts)
    folds = np.asarray([caption_fold(t, 2) for t in texts])
    # the folds cut every split alike (the holdout cuts bucket values, a fold their residue)
    assert 0.4 < folds.mean() < 0.6 and 0.4 < folds[held].mean() < 0.6
    for i in (0, 1):
        (_, tr), (_, va) = selections(TrainConfig(**base, folds=2, fold=i))
        m = tr.mask(texts)
        assert not (m & (folds == i)).any()                       # never sees its own fold
        assert (m == (train.mask(texts) & (folds != i))).all()    # and nothing else changes
        assert (va.mask(texts) == held).all()                     # round 1's validation rows
    with pytest.raises(ValueError, match="fold must be in"):
        TrainConfig(**base, folds=2, fold=2)
