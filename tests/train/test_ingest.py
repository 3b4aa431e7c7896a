"""Training ingest (real local Ray): the rank pipeline's plan (the reader apart from the
decoder).  The stream's order and resume: test_order.py; the reader itself: test_reader.py."""

from __future__ import annotations

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from align_ray.train import ingest


def test_the_reader_is_not_fused_into_the_decoder(ray_cluster, tmp_path, capsys):
    """With one decode task per rank (the usual case) Ray Data fused the window reader into the
    decoder and bundled 64 windows into one task: the first batch of a segment waited until the
    whole segment was decoded (and every decoded row of it sat in the object store).  The
    reader must stay an operator of its own (ingest.RankStream.dataset)."""
    from align_ray.train.config import TrainConfig
    from align_ray.train.selection import Selection

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [b"x"] * 40, "text": ["t"] * 40}), path)
    cfg = TrainConfig(data=[str(path)], image_col="image", text_col="text", workers=2,
                      data_workers=2, shuffle_buffer=8)
    assert ingest.data_tasks_per_rank(cfg) == 1          # equal pool sizes: fusable
    data = ingest.train_data(cfg, [str(path)], Selection(),
                             tokenizer={"vocab.txt": b"[PAD]\n[UNK]\n"})
    ds = ingest.RankStream(data, rank=0, world=2, batch_size=4).dataset(40)
    capsys.readouterr()
    ds.explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "MapBatches(read_windows)]" in plan and "MapBatches(preprocess_batch)]" in plan
    assert "read_windows)->" not in plan


def test_check_columns_picks_the_image_column_when_none_is_given(small_parquet, tmp_path):
    """No --image-col: ``jpg`` (what the data and filter stages write) if the first training
    input has it, else ``image`` (the dev set's); a given one is kept, and then checked."""
    from align_ray.train.config import TrainConfig
    from align_ray.train.selection import selections

    cfg = TrainConfig(data=[small_parquet], text_col="alt_text", output="o")
    assert cfg.image_col is None
    ingest.check_columns(cfg, *selections(cfg))
    assert cfg.image_col == "image"
    stage = tmp_path / "stage.parquet"
    pq.write_table(pa.table({"jpg": [b"x"], "image": [b"y"], "text": ["a"]}), stage)
    cfg = TrainConfig(data=[str(stage)], output="o")
    ingest.check_columns(cfg, *selections(cfg))
    assert cfg.image_col == "jpg"
    cfg = TrainConfig(data=[small_parquet], text_col="alt_text", image_col="jpg", output="o")
    with pytest.raises(ValueError, match="no column 'jpg'"):
        ingest.check_columns(cfg, *selections(cfg))


def test_check_columns_lists_each_input_and_counts_its_split_once(tmp_path, monkeypatch):
    """With --split-col, train and val select from the same files: they are listed once and the
    split column read once, not once per selection (a listing is a LIST call on S3)."""
    import pyarrow.dataset as pads

    from align_ray import layout
    from align_ray.train.config import TrainConfig
    from align_ray.train.selection import selections

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [b"x"] * 6, "text": ["t"] * 6,
                             "split": ["train"] * 4 + ["val"] * 2}), path)
    listed, read = [], []
    real_files, real_dataset = layout.parquet_files, pads.dataset
    monkeypatch.setattr(layout, "parquet_files", lambda p: listed.append(p) or real_files(p))
    monkeypatch.setattr(ingest.pads, "dataset",
                        lambda *a, **k: read.append(a) or real_dataset(*a, **k))
    cfg = TrainConfig(data=[str(path)], split_col="split", output="o")
    ingest.check_columns(cfg, *selections(cfg))
    assert listed == [str(path)] and len(read) == 1
    cfg = TrainConfig(data=[str(path)], split_col="split", val_split="test", output="o")
    with pytest.raises(ValueError, match=r"no row has split == 'test'; its values: "
                                         r"'train' \(4 rows\), 'val' \(2 rows\)"):
        ingest.check_columns(cfg, *selections(cfg))
