"""The training order (DataOrder / RankStream) and the O(world) data position (issue 13).

* the order is a pure function of (seed, files + row counts, world): every row once per epoch,
  each rank its own rows, a new slice order every epoch, rows mixed across files;
* a checkpoint is the same size for a 10 k-row and a 1 M-row dataset (real parquet footers,
  the real Ray Data stream read far into the 1 M-row epoch, ``checkpoint.save``);
* a stream resumed from a position hands out the uninterrupted stream's batches, bit for bit
  (rows, pixels with seeded crops/flips, tokens), undecodable rows skipped the same way.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from align_ray.model import DualEncoder, ModelConfig
from align_ray.model.tokenizer import train_wordpiece
from align_ray.train import checkpoint as ckpt_lib
from align_ray.train import ingest, preprocess, selection
from align_ray.train.order import DataOrder, same_file_fraction, uniform_same_file_fraction, window_order
from align_ray.train.config import TrainConfig
from align_ray.train.optim import build_optimizer, build_scheduler

from .conftest import DEV


def _rows_of(order: DataOrder, rank: int, epoch: int) -> list[tuple[int, int]]:
    """(file, row) of each row of the rank's epoch, in stream order (metadata only)."""
    out = []
    for it in order.windows(rank, epoch, 0, order.epoch_rows(epoch, rank)):
        if it["epoch"] != epoch:
            break
        rows = [(f, s + i) for f, s, n in zip(it["file"], it["start"], it["len"])
                for i in range(n)]
        perm = window_order(order.seed, epoch, rank, it["window"], len(rows))
        out += [rows[j] for j in perm[it["skip"]:]]
    return out


def test_order_is_deterministic_each_row_once_per_epoch_new_order_each_epoch():
    rows = [700, 300, 1000, 50, 950]
    order = DataOrder(rows, seed=3, world=3, window_rows=256, slice_rows=64)
    assert (order.slice_rows, order.window_slices) == (32, 8)  # >= 8 slices per window
    epochs = []
    for e in range(2):
        per_rank = [_rows_of(order, r, e) for r in range(3)]
        flat = [x for p in per_rank for x in p]
        assert len(flat) == len(set(flat)) == sum(rows)          # every row once, no rank shares
        assert [len(p) for p in per_rank] == [order.epoch_rows(e, r) for r in range(3)]
        epochs.append(per_rank[0])
    assert epochs[0] != epochs[1]                                # a new order every epoch
    again = DataOrder(rows, seed=3, world=3, window_rows=256, slice_rows=64)
    assert _rows_of(again, 0, 1) == epochs[1]                    # a pure function of its inputs
    other = DataOrder(rows, seed=4, world=3, window_rows=256, slice_rows=64)
    assert _rows_of(other, 0, 0) != epochs[0]
    # the rest of the stream from a position = the uninterrupted stream's rest
    full = order.source_files(1, 0, 0, 2500)
    for k in (1, 37, 999, 1100):
        rest = order.source_files(1, *order.normalize(1, 0, k), 2500 - k)
        assert (rest == full[k:]).all(), k


def test_rows_are_mixed_across_files():
    """Same-file pairs in a batch vs uniform sampling (64 files x 1,000 rows, batch 64)."""
    rows = [1000] * 64
    order = DataOrder(rows, seed=0, world=2, window_rows=4096, slice_rows=512)
    assert order.window_slices == 8
    src = order.source_files(0, 0, 0, 64 * 200).reshape(200, 64)
    got = float(np.mean([same_file_fraction(b) for b in src]))
    uniform = uniform_same_file_fraction(rows)               # 1/64
    assert uniform == pytest.approx(1 / 64)
    # a window of 8 slices of 512 rows: ~1/8 of the pairs share a file (slices from one
    # file may meet in a window); one file per batch would be 1.0
    assert 0.08 < got < 0.2, got
    wide = DataOrder(rows, seed=0, world=2, window_rows=32768, slice_rows=512)
    src = wide.source_files(0, 0, 0, 64 * 200).reshape(200, 64)
    got_wide = float(np.mean([same_file_fraction(b) for b in src]))
    assert got_wide < 0.04, got_wide                                # 64 slices per window


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _write_stub(path: Path, files: int, rows_per_file: int) -> list[str]:
    """Metadata-sized rows: a 2x2 PNG (the same bytes in every row) and a caption."""
    png, out = _png(), []
    for f in range(files):
        n = rows_per_file
        t = pa.table({"image": pa.array([png] * n, pa.binary()),
                      "text": pa.array([f"row {f} {i}" for i in range(n)])})
        p = path / f"part-{f:03d}.parquet"
        pq.write_table(t, p, row_group_size=4096)
        out.append(str(p))
    return out


def _tok_files() -> dict[str, bytes]:
    return preprocess.tokenizer_files(train_wordpiece([f"row {i} {i}" for i in range(50)], 200, 16))


def _cfg(data: list[str], **kw) -> TrainConfig:
    base = dict(data=data, image_col="image", text_col="text", workers=2, batch_size=4,
                shuffle_buffer=64, data_workers=1, data_batch_size=16, seed=0,
                model=ModelConfig.tiny(embed_dim=16, vocab_size=200, max_length=16))
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoint_size_does_not_grow_with_the_dataset(ray_cluster, tmp_path):
    """10 k and 1 M rows: same files, same sizes; the 1 M-row stream is read from a position far
    into its epoch without touching the rows before it."""
    model = DualEncoder(ModelConfig.tiny(embed_dim=16, vocab_size=200, max_length=16), 200)
    cfg0 = _cfg(["unused"])
    opt = build_optimizer(model, cfg0)
    sched = build_scheduler(opt, cfg0)
    tok = _tok_files()
    sizes = {}
    for name, files, per_file in (("10k", 2, 5_000), ("1m", 8, 125_000)):
        d = tmp_path / name
        d.mkdir()
        paths = _write_stub(d, files, per_file)
        data = ingest.train_data(_cfg(paths), paths, selection.Selection(), tokenizer=tok)
        assert sum(data.rows) == files * per_file
        positions = []
        for rank in range(2):
            order = data.order(2)
            start = order.normalize(rank, 0, order.epoch_rows(0, rank) - 10)  # 10 rows left
            stream = ingest.RankStream(data, rank=rank, world=2, batch_size=4, position=start)
            it = stream.batches(3)
            got = [next(it) for _ in range(3)]  # across the epoch boundary into epoch 1
            it.close()
            assert all(len(b["row_id"]) == 4 for b in got)
            assert [int(b["pos_epoch"][-1]) for b in got] == [0, 0, 1]
            assert stream.position == (1, 2)
            positions.append(list(stream.position))
        state = ckpt_lib.TrainState(step=3, epoch=1, samples_seen=24, global_batch=8,
                                    world_size=2, data_position=positions)
        out = ckpt_lib.save(tmp_path / f"ckpt-{name}", model=model, optimizer=opt,
                            scheduler=sched, state=state, rng_states=[ckpt_lib.rng_state()] * 2,
                            metrics=[])
        sizes[name] = {p.name: p.stat().st_size for p in out.iterdir()}
        back = ckpt_lib.read_state(out)
        assert back.data_position == positions
        assert [ckpt_lib.rank_position(back, r, 2) for r in range(2)] == [(1, 2), (1, 2)]
    assert sizes["10k"] == sizes["1m"]
    assert sizes["1m"]["data_position.npy"] == 128 + 2 * 2 * 8  # npy header + [world, 2] int64


@pytest.fixture(scope="module")
def dev_files(tmp_path_factory):
    """160 dev-set rows in 5 files (+1 undecodable image in file 2, + 20 val rows to skip)."""
    t = pq.read_table(DEV, columns=["image", "alt_text", "dev_split"])
    train = t.filter(pc.equal(t["dev_split"], "train")).slice(0, 140)
    val = t.filter(pc.equal(t["dev_split"], "val")).slice(0, 20)
    bad = pa.table({"image": pa.array([b"not an image"], pa.binary()), "alt_text": ["broken"],
                    "dev_split": ["train"]}).cast(t.schema)
    rows = pa.concat_tables([train.slice(0, 70), bad, val, train.slice(70)])
    d = tmp_path_factory.mktemp("dev5")
    for f in range(5):
        pq.write_table(rows.slice(f * 33, 33), d / f"part-{f}.parquet", row_group_size=10)
    return str(d)


def _take(data, rank: int, n: int, position=(0, 0)) -> tuple[list[dict], list]:
    stream = ingest.RankStream(data, rank=rank, world=2, batch_size=4, position=position)
    it = stream.batches(n)
    out, pos = [], []
    for _ in range(n):
        b = next(it)
        out.append({k: v.numpy().copy() for k, v in b.items()})
        pos.append(stream.position)
    it.close()
    return out, pos


def test_resumed_stream_is_bit_identical(ray_cluster, dev_files):
    cfg = _cfg([dev_files], text_col="alt_text", split_col="dev_split", shuffle_buffer=32,
               crop_scale=(0.5, 1.0), hflip=0.5)
    (paths, sel), _ = selection.selections(cfg)
    tok = preprocess.tokenizer_files(train_wordpiece(["a grinning face"] * 5, 200, 16))
    data = ingest.train_data(cfg, paths, sel, tokenizer=tok)
    n, k = 12, 5
    for rank in range(2):
        full, pos = _take(data, rank, n)
        rest, _ = _take(data, rank, n - k, position=pos[k - 1])
        for a, b in zip(full[k:], rest):
            assert set(a) == set(b)
            for col in a:
                assert np.array_equal(a[col], b[col]), col  # pixels too: seeded augmentation
        ids = np.concatenate([b["row_id"] for b in full])
        assert len(set(ids.tolist())) == len(ids) == n * 4  # 12 x 4 < an epoch: no repeats
    # the two ranks read disjoint rows
    r0 = np.concatenate([b["row_id"] for b in _take(data, 0, 8)[0]])
    r1 = np.concatenate([b["row_id"] for b in _take(data, 1, 8)[0]])
    assert not set(r0.tolist()) & set(r1.tolist())


def test_resampled_draws_are_fresh_disjoint_across_ranks_and_cut_to_one_step():
    """``resampled``: each epoch is one window per rank, drawn afresh; the ranks of one draw
    share nothing; a one-row-slice draw stops at ``take`` rows (one step of the rank)."""
    rows = [700, 300]
    order = DataOrder(rows, seed=1, world=2, window_rows=8192, resampled=True, draw_rows=48)
    assert (order.slice_rows, order.take) == (1, 48)
    draws = []
    for e in range(3):
        per_rank = [order.windows(r, e, 0, 1)[0] for r in range(2)]
        assert all(it["epoch"] == e and it["window"] == 0 for it in per_rank)
        keys = [set(zip(it["file"], it["start"])) for it in per_rank]
        assert not keys[0] & keys[1]                                 # disjoint within a draw
        assert sum(order.epoch_rows(e, r) for r in range(2)) == 1000
        draws.append(order.source_files(0, e, 0, 48))
        # the stream of rank 0 is 48 rows of draw e, then draw e + 1
        assert len(order.source_files(0, e, 0, 10_000)) >= 48
    src = order.source_files(0, 0, 0, 3 * 48)
    assert (src == np.concatenate(draws)).all()
    # big data keeps whole windows of slices (no cut), one fresh window per epoch
    big = DataOrder([100_000] * 4, seed=1, world=2, window_rows=8192, resampled=True,
                    draw_rows=48)
    assert (big.slice_rows, big.take, big.window_slices) == (1024, 0, 8)
    assert big.epoch_rows(0, 0) == 8192 and len(big.windows(0, 0, 0, 8192)) == 1
    starts = [tuple(big.windows(0, e, 0, 1)[0]["start"]) for e in range(4)]
    assert len(set(starts)) == 4
    # auto (None, TrainConfig's default): resampled when every rank's epoch fits one window
    assert DataOrder(rows, seed=1, world=2, window_rows=500, resampled=None).resampled
    assert not DataOrder(rows, seed=1, world=2, window_rows=499, resampled=None).resampled
    assert TrainConfig(data=["x"]).resampled is None


def test_resampled_stream_draws_each_step_afresh_and_resumes_bit_identically(ray_cluster,
                                                                              dev_files):
    """A resampled stream (one-row slices): batch k of a rank is draw k's first ``batch_size``
    selected rows (val rows and undecodable images aside), distinct within the global batch;
    rows come back across draws; a resumed stream hands out the same batches."""
    cfg = _cfg([dev_files], text_col="alt_text", split_col="dev_split", shuffle_buffer=512,
               resampled=True)
    (paths, sel), _ = selection.selections(cfg)
    tok = preprocess.tokenizer_files(train_wordpiece(["a grinning face"] * 5, 200, 16))
    data = ingest.train_data(cfg, paths, sel, tokenizer=tok)
    assert data.order(2, draw_rows=4).take == 4
    n, k = 10, 4
    both = []
    for rank in range(2):
        full, pos = _take(data, rank, n)
        # one draw per step: batch j is all of draw (epoch) j of the stream, its rows after the
        # first 4 selected ones never read (an undecodable row drawn would be filled from the
        # next draw; none is among these draws' first rows)
        assert [set(b["pos_epoch"].tolist()) for b in full] == [{j} for j in range(n)]
        assert [p[0] for p in pos] == list(range(n)) and all(4 <= p[1] < 10 for p in pos)
        rest, _ = _take(data, rank, n - k, position=pos[k - 1])
        for a, b in zip(full[k:], rest):
            for col in a:
                assert np.array_equal(a[col], b[col]), col
        both.append(full)
    for j in range(n):  # the global batch of a step: distinct rows
        ids = np.concatenate([both[0][j]["row_id"], both[1][j]["row_id"]])
        assert len(set(ids.tolist())) == 8
    ids = [i for b in both[0] for i in b["row_id"].tolist()]
    assert len(set(ids)) < len(ids)  # 40 draws from 140 train rows: some come back
