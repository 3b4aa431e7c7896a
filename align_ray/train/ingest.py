"""Ray Data ingest for training: parquet -> (decode, augment, tokenize on Ray Data CPU tasks) ->
numpy ``pixels`` [n,3,S,S] **uint8** (crop/flip/resize done; the trainer normalises with the
model's mean/std on its device: 4x less data through the object store than float32),
``input_ids`` / ``attention_mask`` [n,L] int64, ``row_id`` int64 (and ``match_id`` int64 for
validation sets; training rows also carry their stream position ``pos_epoch`` / ``pos_offset``
and ``src_file``).

* Inputs: a stage output DIR (its DIR/parquet), a parquet file, folder or glob; local or ``s3://``.
* ``row_id`` = 64-bit BLAKE2b of (caption, image bytes): a stable identity per sample.
* Held-out rows (``val_fraction``) are chosen by a hash of the *caption*, so no validation caption
  is ever a training caption; the tokenizer is trained on training captions only.
* Decoding runs as Ray Data tasks (``data_cpus`` each) on the CPU workers, never in the trainers.
* Undecodable images are skipped, never fatal: each worker logs its count and the distinct row_ids
  are added to a named :class:`BadImageCounter` actor that ``run`` reads at the end.  ``run``
  pins that actor to the driver's node (a worker node's loss must not take the count with it)
  and treats a lost count as unknown, never as a failed run (``train/resilience.py``).

Training order and resume (decision)
------------------------------------
**Each rank builds and runs its own Ray Data pipeline over its own rows** (:class:`RankStream`,
started inside the Train worker from :class:`TrainData` shipped by the driver), instead of one
dataset cut by ``streaming_split``.  ``streaming_split`` hands blocks to whichever rank asks first,
so which rows a rank trains on, and in what order, is not reproducible, and the only exact
resume was to list every consumed row id (8 bytes a sample: gigabytes per checkpoint at ALIGN's
1.8 B pairs) and decode those rows again to drop them.  With per-rank pipelines the order is a
pure function of (seed, file list + row counts, world size) (:class:`DataOrder`):

* files are cut into slices (<= ``SLICE_ROWS`` rows; smaller for small data or small windows);
  every epoch a seeded permutation of all slices (a new file order each epoch) is dealt to the
  ranks round robin -- each rank reads only its own slices, so nothing is read twice;
* a rank's slices are grouped into windows of ``shuffle_buffer`` rows (at least
  ``MIN_WINDOW_SLICES`` slices when the data allows), whose rows are shuffled by a seeded
  permutation: a batch draws from ~8+ slices of different files, not from one file (the mixing
  figure: ``same_file_fraction``, BENCHMARKS.md);
* a global batch is the ranks' batches of one step (rank r's own next ``batch_size`` rows, K of
  them per step with ``accum_steps`` = K), so ``samples_seen == step * global_batch``;
* a rank's position is (epoch, offset into its epoch stream), two integers, so a checkpoint is
  O(world) (checkpoint.py); the rest of the order is recomputed from metadata on resume, and
  only the partly consumed window is read again (not decoded);
* rows that are undecodable or not selected are skipped and the batch is filled from the rank's
  next rows: the same rows every time, so the batches stay full and deterministic; crops and
  flips are seeded by the row's stream position, so a resumed run's pixels are bit-identical.

The pipeline per rank: ``from_items`` (one item per window) -> one reader task at a time (0 CPU:
reads the window's slices, only the row groups they overlap, and emits the rows in window order
in blocks of ``data_batch_size``) -> ``ceil(data_workers / workers)`` decode/augment/tokenize
tasks (``data_cpus`` each), with ``preserve_order`` so blocks arrive in stream order.  One
execution covers the rest of the epoch (or what the run still needs, if more); the next starts
exactly after the last batch handed out.  Costs: a window's rows sit in the reader's memory at
once (``shuffle_buffer`` x row bytes); a slice smaller than its parquet row group reads the whole
group (write training shards with row groups of <= ``SLICE_ROWS`` rows); the world size is part
of the order (a resume on a different number of workers restarts at the next epoch).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.fs as pafs
import ray

from align_ray import layout, ray_env
from align_ray.model.tokenizer import load_tokenizer, train_wordpiece
from align_ray.model.transforms import decode_rgb, eval_transform, train_transform
from align_ray.model.transforms import image_norm  # noqa: F401 - loop.py's Normalize imports it here

log = logging.getLogger(__name__)
_BUCKETS = 1_000_000
STREAM_COLUMNS = ("pos_epoch", "pos_offset", "src_file")


def _hash64(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little", signed=True)


def row_id(text: str, image: bytes) -> int:
    return _hash64(text.encode("utf-8", "replace"), image or b"")


def value_id(value: Any) -> int:
    """A stable int64 for a match value (str/number/None)."""
    return _hash64(repr(value).encode("utf-8", "replace"))


def text_bucket(text: str) -> int:
    return (_hash64(text.encode("utf-8", "replace")) % _BUCKETS + _BUCKETS) % _BUCKETS


def caption_fold(text: str, folds: int) -> int:
    """The cross-fitting fold of a caption: its hash bucket mod ``folds``.  The holdout cuts
    buckets by *value* (bucket < fraction x buckets), so a fold takes the same share of every
    split."""
    return text_bucket(text if isinstance(text, str) else "") % folds


@dataclass(frozen=True)
class Selection:
    """Which rows of the input a dataset keeps: rows whose ``split_col`` equals ``split_value``,
    and/or the caption-hash holdout (``holdout=True`` keeps the held-out share, else the rest),
    less the caption-hash fold ``exclude_fold`` of ``folds`` (cross-fitting, when folds >= 2)."""

    split_col: str | None = None
    split_value: str | None = None
    holdout_fraction: float = 0.0
    holdout: bool = False
    folds: int = 0
    exclude_fold: int = -1

    def columns(self) -> list[str]:
        return [self.split_col] if self.split_col else []

    def mask(self, texts: list[str], split_values: Any = None) -> np.ndarray:
        keep = np.ones(len(texts), dtype=bool)
        if self.split_col:
            keep &= np.asarray([str(v) == self.split_value for v in split_values], dtype=bool)
        if self.holdout_fraction > 0:
            cut = int(self.holdout_fraction * _BUCKETS)
            held = np.asarray([text_bucket(t) < cut for t in texts], dtype=bool)
            keep &= held if self.holdout else ~held
        if self.folds >= 2:
            keep &= np.asarray([caption_fold(t, self.folds) != self.exclude_fold for t in texts],
                               dtype=bool)
        return keep


def selections(cfg) -> tuple[tuple[list[str], Selection], tuple[list[str], Selection] | None]:
    """(train paths, selection), (val paths, selection) or None, per TrainConfig's val options;
    with ``folds`` >= 2 the training rows also leave out caption-hash fold ``fold``."""
    fold = {"folds": cfg.folds, "exclude_fold": cfg.fold} if cfg.folds >= 2 else {}
    if cfg.val_data:
        return (cfg.data, Selection(**fold)), (cfg.val_data, Selection())
    if cfg.split_col:
        return ((cfg.data, Selection(cfg.split_col, cfg.train_split, **fold)),
                (cfg.data, Selection(cfg.split_col, cfg.val_split)))
    if cfg.val_fraction > 0:
        return ((cfg.data, Selection(holdout_fraction=cfg.val_fraction, holdout=False, **fold)),
                (cfg.data, Selection(holdout_fraction=cfg.val_fraction, holdout=True)))
    return (cfg.data, Selection(**fold)), None


def resolve_inputs(paths: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem and the sorted parquet files behind ``paths`` (stage DIR -> DIR/parquet)."""
    if not paths:
        raise ValueError("no input data given (--data)")
    fs0, files = None, []
    for p in paths:
        fs, found = layout.parquet_files(p)
        if fs0 is not None and type(fs) is not type(fs0):
            raise ValueError("all inputs must be on one filesystem (all local or all s3://)")
        fs0 = fs
        files.extend(found)
    return fs0, sorted(dict.fromkeys(files))


def iter_texts(paths: list[str], text_col: str, selection: Selection,
               batch_size: int = 4096) -> Iterator[str]:
    """Captions of the selected rows, streamed (only the text and split columns are read)."""
    fs, files = resolve_inputs(paths)
    cols = list(dict.fromkeys([text_col, *selection.columns()]))
    ds = ray_env.read_parquet(files, filesystem=fs, columns=cols)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        texts = [t if isinstance(t, str) else "" for t in batch[text_col]]
        split = batch[selection.split_col] if selection.split_col else None
        for t, k in zip(texts, selection.mask(texts, split)):
            if k and t:
                yield t


def build_tokenizer(cfg, paths: list[str], selection: Selection):
    """The model's tokenizer: ``cfg.model.tokenizer`` / ``text_model``'s, else WordPiece trained on
    the driver from the training captions (streamed, images never read)."""
    src = cfg.model.tokenizer or cfg.model.text_model
    if src:
        return load_tokenizer(src, max_length=cfg.model.max_length)
    return train_wordpiece(iter_texts(paths, cfg.text_col, selection), cfg.model.vocab_size,
                           cfg.model.max_length)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The saved tokenizer as {file name: bytes}: small, picklable, shipped to Ray workers."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def tokenizer_from_files(files: dict[str, bytes], max_length: int | None = None):
    d = tempfile.mkdtemp(prefix="align-tok-")
    for name, data in files.items():
        Path(d, name).write_bytes(data)
    return load_tokenizer(d, max_length=max_length)


@ray.remote(num_cpus=0)
class BadImageCounter:
    """Distinct row_ids of undecodable images (a named actor, fire-and-forget adds)."""

    def __init__(self) -> None:
        self._ids: set[int] = set()

    def add(self, ids: list[int]) -> None:
        self._ids.update(ids)

    def count(self) -> int:
        return len(self._ids)


class Preprocess:
    """Select rows, decode + augment images, tokenize captions (one per Ray Data worker)."""

    def __init__(self, *, image_col: str, text_col: str, selection: Selection, image_size: int,
                 train: bool, tokenizer: dict[str, bytes],
                 max_length: int, max_pixels: int, match_col: str | None = None,
                 with_match: bool = False, counter: str | None = None,
                 crop_scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.0, grayscale: float = 0.0,
                 text_spec: str | None = None) -> None:
        self.image_col, self.text_col, self.selection = image_col, text_col, selection
        self.match_col, self.with_match, self.size = match_col, with_match, image_size
        self.max_length, self.max_pixels, self.counter = max_length, max_pixels, counter
        # a library model (train --init-from) brings its own tokenizer: model/finetune.py
        self.tok = None if text_spec else tokenizer_from_files(tokenizer, max_length)
        if text_spec:
            from align_ray.model.finetune import text_tokenizer

            self.text_tok = text_tokenizer(text_spec, max_length)
        # mean 0 / std 1/255 makes the transforms return the resized pixels as 0..255 floats
        ident = ((0.0, 0.0, 0.0), (1 / 255.0,) * 3)
        aug = dict(scale=tuple(crop_scale), flip=hflip, jitter=color_jitter, gray=grayscale)
        self.transform = (train_transform(image_size, *ident, **aug) if train
                          else eval_transform(image_size, *ident))
        # training rows with an ``aug_seed`` (RankStream) get their own seeded augmentation
        self.seeded = (lambda s: train_transform(image_size, *ident, seed=s, **aug)) \
            if train else None
        # validation rows decode like the Embedder that serves the model (JPEG DCT draft at the
        # model size), so train-time val metrics and served embeddings see the same pixels
        self.draft = None if train else image_size
        self.bad_total = 0

    def _report_bad(self, ids: list[int]) -> None:
        self.bad_total += len(ids)
        log.warning("skipped %d undecodable image(s) in this batch (%d so far in worker pid %d)",
                    len(ids), self.bad_total, os.getpid())
        if self.counter:
            try:
                ray.get_actor(self.counter).add.remote(ids)
            except ValueError:  # counter gone (driver exited): the log line is all we have
                pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [t if isinstance(t, str) else "" for t in batch[self.text_col]]
        images = batch[self.image_col]
        split = batch[self.selection.split_col] if self.selection.split_col else None
        keep = self.selection.mask(texts, split)
        seeds = batch.get("aug_seed") if self.seeded is not None else None
        pixels, ids, kept, bad = [], [], [], []
        for i in np.flatnonzero(keep):
            data = images[i]
            rid = row_id(texts[i], bytes(data) if data is not None else b"")
            transform = self.transform if seeds is None else self.seeded(int(seeds[i]))
            try:
                if data is None or len(data) == 0:
                    raise ValueError("empty image")
                arr = transform(decode_rgb(bytes(data), max_pixels=self.max_pixels,
                                           draft=self.draft))
            except ValueError:
                bad.append(rid)
                continue
            pixels.append(np.rint(arr).clip(0, 255).astype(np.uint8))
            ids.append(rid)
            kept.append(int(i))
        if bad:
            self._report_bad(bad)
        n, L = len(kept), self.max_length
        out: dict[str, np.ndarray] = {
            "pixels": (np.stack(pixels) if n
                       else np.zeros((0, 3, self.size, self.size), np.uint8)),
            "row_id": np.asarray(ids, dtype=np.int64),
        }
        if n and self.tok is None:
            out["input_ids"], out["attention_mask"] = self.text_tok([texts[i] for i in kept])
        elif n:
            enc = self.tok([texts[i] for i in kept], padding="max_length", truncation=True,
                           max_length=L, return_tensors="np", return_token_type_ids=False)
            out["input_ids"] = enc["input_ids"].astype(np.int64)
            out["attention_mask"] = enc["attention_mask"].astype(np.int64)
        else:
            out["input_ids"] = np.zeros((0, L), np.int64)
            out["attention_mask"] = np.zeros((0, L), np.int64)
        for col in STREAM_COLUMNS:  # the stream position travels with the row (RankStream)
            if col in batch:
                out[col] = np.asarray(batch[col])[np.asarray(kept, dtype=np.int64)]
        if self.with_match:
            vals = batch[self.match_col] if self.match_col else np.asarray(texts, dtype=object)
            out["match_id"] = np.asarray([value_id(vals[i]) for i in kept], dtype=np.int64)
        return out


_CACHE: dict[str, Preprocess] = {}


def preprocess_batch(batch: dict[str, np.ndarray], *, cache_key: str, **kwargs) -> dict:
    """Task-based ``map_batches`` function: one :class:`Preprocess` per worker process (cached),
    so every epoch's re-execution of the pipeline reuses warm Ray workers (imports, tokenizer)
    instead of starting a fresh actor pool."""
    pre = _CACHE.get(cache_key)
    if pre is None:
        pre = _CACHE[cache_key] = Preprocess(**kwargs)
    return pre(batch)


def preprocess_nonempty(batch: dict[str, np.ndarray], *, cache_key: str, **kwargs
                        ) -> Iterator[dict]:
    """:func:`preprocess_batch` as a generator that yields no block for a batch none of whose
    rows was kept (a block of the file with no row of the validation split, say).  Ray (2.60)
    cannot build its tensor column from a 0-row multi-dimensional array: it pickled that
    block instead, with an ArrowConversionError warning in every run with a validation split."""
    out = preprocess_batch(batch, cache_key=cache_key, **kwargs)
    if len(out["row_id"]):
        yield out


def count_rows(fs: pafs.FileSystem, files: list[str]) -> int:
    """Rows in ``files`` from the parquet footers (no data read)."""
    return int(sum(file_rows(fs, files)))


def file_rows(fs: pafs.FileSystem, files: list[str]) -> list[int]:
    """Each file's row count from its parquet footer (no data read; footers fetched in parallel,
    which matters on ``s3://``)."""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    def rows(path: str) -> int:
        with fs.open_input_file(path) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(rows, files))


# -- the training order: a pure function of (seed, files + row counts, world), O(1) position --

SLICE_ROWS = 1024       # largest slice (the unit of the per-epoch permutation)
MIN_WINDOW_SLICES = 8   # a shuffle window holds at least this many slices (when the data allows)
_U64 = np.uint64


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % (1 << 64) for k in key]))


def window_order(seed: int, epoch: int, rank: int, window: int, n: int) -> np.ndarray:
    """The seeded permutation of one shuffle window's ``n`` rows."""
    return _rng(seed, 2, epoch, rank, window).permutation(n)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (vectorised, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(_U64) + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def aug_seeds(seed: int, rank: int, epoch: int, offsets: np.ndarray) -> np.ndarray:
    """Per-row augmentation seeds (int64 >= 0) from the row's stream position: a resumed run
    crops and flips every row exactly as the uninterrupted run did."""
    key = _mix64(np.asarray([seed % (1 << 64)], _U64))
    key = _mix64(key ^ _U64(rank % (1 << 64)))
    key = _mix64(key ^ _U64(epoch % (1 << 64)))
    out = _mix64(key ^ np.asarray(offsets).astype(_U64))
    return (out >> _U64(1)).astype(np.int64)


class DataOrder:
    """The order in which one rank reads its training rows, epoch after epoch, for ever.

    * **Slices**: every file is cut into slices of ``slice_rows`` consecutive rows (fewer for a
      small dataset, so that each rank has at least ``MIN_WINDOW_SLICES`` slices per epoch, and
      for a small window, so that a window holds at least that many slices; one row when every
      rank's epoch fits in one window: then the order is uniform sampling without replacement).
    * **Epoch e**: a permutation of all slices seeded by (seed, e): a new file order every epoch.
      Rank r takes slices ``perm[r::world]`` (each rank reads only its own slices: no row is read
      by two ranks, no read amplification).
    * **Windows**: the rank's slices, in that order, are grouped ``window_slices`` at a time; the
      rows of one window are shuffled by a permutation seeded by (seed, e, r, window).  The rows
      of a batch therefore come from ~``window_slices`` different file slices.
    * **Position**: (epoch, offset), offset = rows of the rank's epoch-e stream consumed so far
      (consumed = read, whether kept, skipped as undecodable or not selected).  From it the rest
      of the stream is computed from metadata alone (:meth:`windows`): nothing consumed is read
      or decoded again, except the partly consumed window's rows, which are read (not decoded)
      and dropped.

    Memory: three small arrays per slice (``rows / slice_rows`` slices: 1.8 B rows -> 1.8 M
    slices, ~30 MB) and one permutation per epoch; never a per-row table."""

    def __init__(self, rows: Any, *, seed: int, world: int, window_rows: int,
                 slice_rows: int = SLICE_ROWS) -> None:
        rows = np.asarray(rows, np.int64).reshape(-1)
        total = int(rows.sum())
        if total < world:
            raise ValueError(f"the training data has {total} row(s), fewer than the {world} "
                             "workers that each need their own rows")
        S = min(int(slice_rows), total // (world * MIN_WINDOW_SLICES))
        if window_rows >= MIN_WINDOW_SLICES:  # shuffle_buffer 0: whole slices, rows mixed in one
            S = min(S, int(window_rows) // MIN_WINDOW_SLICES)
        if total <= world * int(window_rows):
            # every rank's epoch fits in one shuffle window, which reads each row group once
            # whatever the slicing: one-row slices cost nothing more and make each rank's epoch
            # a uniform random share of the rows (uniform sampling without replacement).  With
            # 1/(world x 8) of a file per slice instead, a rank's batches drew from ~8 slices:
            # on a topically sorted file, correlated negatives that fit the dev set measurably
            # more slowly (BENCHMARKS.md "Training quality").
            S = 1
        S = max(1, S)
        n = -(-rows // S)  # slices per file
        self.slice_file = np.repeat(np.arange(len(rows), dtype=np.int32), n)
        first = np.repeat(np.cumsum(n) - n, n)
        self.slice_start = (np.arange(int(n.sum()), dtype=np.int64) - first) * S
        self.slice_len = np.minimum(S, rows[self.slice_file] - self.slice_start)
        self.rows, self.total, self.seed, self.world = rows, total, int(seed), int(world)
        self.slice_rows = S
        self.window_slices = max(1, int(window_rows) // S)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def rank_epoch(self, epoch: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the rank's slice ids in epoch order, each slice's first offset + the end offset,
        each window's first offset + the end offset)."""
        key = (int(epoch), int(rank))
        if key not in self._cache:
            if self._perm[0] != epoch:  # one permutation per epoch, shared by the ranks
                perm = _rng(self.seed, 1, epoch).permutation(len(self.slice_len))
                self._perm = (int(epoch), perm)
            mine = self._perm[1][rank::self.world]
            starts = np.concatenate([[0], np.cumsum(self.slice_len[mine])]).astype(np.int64)
            wstarts = np.concatenate([starts[:-1][::self.window_slices], starts[-1:]])
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (mine, starts, wstarts)
        return self._cache[key]

    def epoch_rows(self, epoch: int, rank: int) -> int:
        return int(self.rank_epoch(epoch, rank)[1][-1])

    def normalize(self, rank: int, epoch: int, offset: int) -> tuple[int, int]:
        """(epoch, offset) with offset inside the epoch (the end of an epoch = the next one's 0)."""
        while offset >= self.epoch_rows(epoch, rank):
            offset -= self.epoch_rows(epoch, rank)
            epoch += 1
        return int(epoch), int(offset)

    def windows(self, rank: int, epoch: int, offset: int, min_rows: int) -> list[dict]:
        """Read items for the rank's stream from (epoch, offset) on, whole windows (the first one
        from ``offset``), covering at least ``min_rows`` rows."""
        epoch, offset = self.normalize(rank, epoch, offset)
        items: list[dict] = []
        covered = 0
        while covered < max(1, min_rows):
            mine, _, wstarts = self.rank_epoch(epoch, rank)
            w = int(np.searchsorted(wstarts, offset, side="right")) - 1
            while w < len(wstarts) - 1 and covered < max(1, min_rows):
                ids = mine[w * self.window_slices:(w + 1) * self.window_slices]
                items.append({"epoch": epoch, "window": w, "base": int(wstarts[w]),
                              "skip": int(offset - wstarts[w]),
                              "file": self.slice_file[ids].tolist(),
                              "start": self.slice_start[ids].tolist(),
                              "len": self.slice_len[ids].tolist()})
                covered += int(wstarts[w + 1]) - offset
                offset = int(wstarts[w + 1])
                w += 1
            epoch, offset = epoch + 1, 0
        return items

    def source_files(self, rank: int, epoch: int, offset: int, n: int) -> np.ndarray:
        """The file index of each of the next ``n`` rows of the rank's stream (metadata only:
        what the reader will emit, before rows are dropped as undecodable/unselected)."""
        out = []
        for it in self.windows(rank, epoch, offset, n):
            src = np.repeat(np.asarray(it["file"], np.int32), it["len"])
            order = window_order(self.seed, it["epoch"], rank, it["window"], len(src))
            out.append(src[order[it["skip"]:]])
        return np.concatenate(out)[:n]


def same_file_fraction(src: np.ndarray) -> float:
    """Fraction of the row pairs of one batch whose rows come from the same file."""
    _, c = np.unique(np.asarray(src), return_counts=True)
    n = int(c.sum())
    return float((c * (c - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


def uniform_same_file_fraction(rows_per_file: Any) -> float:
    """The same fraction for a batch drawn uniformly from all rows (without replacement, in the
    limit of a large corpus: sum over files of (rows_f / rows)^2)."""
    r = np.asarray(rows_per_file, np.float64)
    return float(((r / r.sum()) ** 2).sum())


def _read_slice(cache: dict, fs: pafs.FileSystem, path: str, start: int, n: int,
                columns: list[str]) -> Any:
    """Rows [start, start + n) of one parquet file: only the row groups they overlap are read
    (each once per window: ``cache``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path not in cache:
        f = fs.open_input_file(path)
        pf = pq.ParquetFile(f)
        md = pf.metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        cache[path] = (f, pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), {})
    _, pf, rg_starts, groups = cache[path]
    lo = int(np.searchsorted(rg_starts, start, side="right")) - 1
    hi = int(np.searchsorted(rg_starts, start + n, side="left"))
    for g in range(lo, hi):
        if g not in groups:
            groups[g] = pf.read_row_group(g, columns=columns)
    t = pa.concat_tables([groups[g] for g in range(lo, hi)])
    return t.slice(start - int(rg_starts[lo]), n)


def _read_windows(batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem,
                  columns: list[str], seed: int, rank: int, rows_per_block: int) -> Iterator[Any]:
    """``map_batches`` generator: each read item (one shuffle window, DataOrder.windows) -> its
    rows in the window's seeded order, from its ``skip``-th on, with their stream position
    (``pos_epoch``, ``pos_offset``), source file index (``src_file``) and ``aug_seed``."""
    import pyarrow as pa

    for j in range(len(batch["epoch"])):
        epoch, w = int(batch["epoch"][j]), int(batch["window"][j])
        base, skip = int(batch["base"][j]), int(batch["skip"][j])
        cache: dict = {}
        try:
            parts, src = [], []
            for path, f, s, n in zip(batch["path"][j], batch["file"][j], batch["start"][j],
                                     batch["len"][j]):
                parts.append(_read_slice(cache, filesystem, str(path), int(s), int(n), columns))
                src.append(np.full(int(n), int(f), np.int32))
        finally:
            for handle, *_ in cache.values():
                handle.close()
        table = pa.concat_tables(parts, promote_options="permissive").combine_chunks()
        src_all = np.concatenate(src)
        order = window_order(seed, epoch, rank, w, table.num_rows)
        pos = np.arange(base, base + table.num_rows, dtype=np.int64)
        for k in range(skip, table.num_rows, rows_per_block):
            idx = order[k:k + rows_per_block]
            p = pos[k:k + rows_per_block]
            yield (table.take(pa.array(idx))
                   .append_column("pos_epoch", pa.array(np.full(len(idx), epoch, np.int64)))
                   .append_column("pos_offset", pa.array(p))
                   .append_column("src_file", pa.array(src_all[idx]))
                   .append_column("aug_seed", pa.array(aug_seeds(seed, rank, epoch, p))))


@dataclass
class TrainData:
    """What a train worker needs to build its own Ray Data pipeline (built on the driver, shipped
    in ``train_loop_config``): the files, their row counts and how to preprocess them."""

    files: list[str]
    rows: list[int]
    filesystem: pafs.FileSystem
    columns: list[str]
    preprocess: dict[str, Any]
    cache_key: str
    seed: int
    window_rows: int
    slice_rows: int
    tasks_per_rank: int
    data_cpus: float
    rows_per_block: int
    stream_epochs: int = 0

    def order(self, world: int) -> DataOrder:
        return DataOrder(self.rows, seed=self.seed, world=world, window_rows=self.window_rows,
                         slice_rows=self.slice_rows)


def data_tasks_per_rank(cfg) -> int:
    """Preprocessing tasks of each rank's pipeline: ``data_workers`` shared out, at least 1."""
    return max(1, math.ceil(cfg.data_workers / cfg.workers))


def _preprocess_kwargs(cfg, selection: Selection, *, train: bool, tokenizer: dict[str, bytes],
                       counter: str | None, with_match: bool) -> tuple[dict, str]:
    """Preprocess's keyword arguments and their cache key (one Preprocess per worker process)."""
    match_col = cfg.val_match_col if with_match else None
    kwargs = dict(
        image_col=cfg.image_col, text_col=cfg.text_col, selection=selection,
        image_size=cfg.model.image_size, train=train,
        tokenizer=tokenizer, max_length=cfg.model.max_length,
        max_pixels=cfg.max_image_pixels, match_col=match_col, with_match=with_match,
        counter=counter, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, grayscale=cfg.grayscale, text_spec=_library_spec(cfg))
    key = hashlib.sha1(repr(sorted((k, v) for k, v in kwargs.items() if k != "tokenizer"))
                       .encode() + b"".join(tokenizer[k] for k in sorted(tokenizer))).hexdigest()
    return kwargs, key


def train_data(cfg, paths: list[str], selection: Selection, *, tokenizer: dict[str, bytes],
               counter: str | None = None, slice_rows: int = SLICE_ROWS) -> TrainData:
    """The training input of a run (footers read here, once, on the driver)."""
    fs, files = resolve_inputs(paths)
    cols = list(dict.fromkeys([cfg.image_col, cfg.text_col, *selection.columns()]))
    kwargs, key = _preprocess_kwargs(cfg, selection, train=True, tokenizer=tokenizer,
                                     counter=counter, with_match=False)
    return TrainData(files=files, rows=file_rows(fs, files), filesystem=fs, columns=cols,
                     preprocess=kwargs, cache_key=key, seed=int(cfg.seed),
                     window_rows=int(cfg.shuffle_buffer), slice_rows=int(slice_rows),
                     tasks_per_rank=data_tasks_per_rank(cfg), data_cpus=float(cfg.data_cpus),
                     rows_per_block=int(cfg.data_batch_size),
                     stream_epochs=int(cfg.stream_epochs))


class RankStream:
    """One rank's training batches, in the deterministic order of :class:`DataOrder`, from a
    position on.  Each Ray Data execution ("segment") covers the rest of the current epoch, or
    the rows the rest of the run needs (+25 % for dropped rows) when more (``stream_epochs`` > 0:
    that many of the rank's epochs); when one
    ends, its trailing partial batch is dropped and the next starts at the exact position after
    the last batch handed out, so segment boundaries never change which rows form a batch.
    ``position`` is (epoch, offset) after the last batch handed out."""

    def __init__(self, data: TrainData, *, rank: int, world: int, batch_size: int,
                 position: tuple[int, int] = (0, 0)) -> None:
        self.data, self.rank, self.world, self.batch_size = data, rank, world, batch_size
        self.order = data.order(world)
        self.position = self.order.normalize(rank, *position)
        self.segment_rows = 0

    @property
    def epoch(self) -> int:
        return self.position[0]

    def dataset(self, min_rows: int) -> "ray.data.Dataset":
        """The Ray Data pipeline over the rank's next ``min_rows``+ rows: one read task at a time
        (a window in memory), ``tasks_per_rank`` decode/augment/tokenize tasks, order kept."""
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # blocks come out in stream order
        ctx.enable_progress_bars = False
        d = self.data
        items = self.order.windows(self.rank, *self.position, min_rows)
        for it in items:  # each read task gets its window's paths, never the whole file list
            it["path"] = [d.files[f] for f in it["file"]]
        self.segment_rows = sum(sum(it["len"]) - it["skip"] for it in items)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.execution_options.preserve_order = True  # (the pipeline shares this context)
        ds = ds.map_batches(
            _read_windows, batch_size=1, batch_format="numpy",
            fn_kwargs=dict(filesystem=d.filesystem, columns=d.columns,
                           seed=d.seed, rank=self.rank, rows_per_block=d.rows_per_block),
            compute=ray.data.TaskPoolStrategy(size=1), num_cpus=0)
        # 0 logical CPUs, on purpose: Ray Data (2.60) budgets each execution from its
        # AutoscalingCoordinator, which splits the CPUs left after Train's workers between
        # concurrent executions in integer shares (amount // n).  With one pipeline per rank,
        # 2 workers x 0.5 CPU on a 2-CPU machine leave 1 CPU for 2 pipelines: 0 each, and a task
        # that asks for any CPU never starts ("Cluster resources are not enough to run any
        # task": training hung at its first batch).  A placement group per rank reserves the
        # CPUs but cannot be placed on fragmented nodes (0.25 CPU left on each).  So the
        # decode tasks are bounded by the pool size (tasks_per_rank per rank), and their CPUs
        # are set aside when the run is sized (run.fit_to_cluster counts data_cpus per task).
        return ds.map_batches(
            preprocess_batch, fn_kwargs=dict(cache_key=d.cache_key, **d.preprocess),
            batch_size=d.rows_per_block, batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=d.tasks_per_rank), num_cpus=0)

    def batches(self, n_batches: int) -> Iterator[dict]:
        """Full batches, for ever (``n_batches``: how many the run still needs, to size the
        first segment).  Raises when a whole epoch of the rank's rows gives no batch."""
        left, scale, empty_rows = max(1, n_batches), 1.0, 0
        while True:
            e, o = self.position
            if self.data.stream_epochs:
                need = sum(self.order.epoch_rows(e + i, self.rank)
                           for i in range(self.data.stream_epochs))
            else:  # the rest of this epoch at least: segments end at epoch ends
                need = max(int(1.25 * left * self.batch_size * scale),
                           self.order.epoch_rows(e, self.rank) - o)
            ds = self.dataset(need)
            got = 0
            for b in ds.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                           device="cpu"):
                self.position = self.order.normalize(self.rank, int(b["pos_epoch"][-1]),
                                                     int(b["pos_offset"][-1]) + 1)
                got += 1
                left = max(1, left - 1)
                yield b
            if got:
                scale, empty_rows = 1.0, 0
                continue
            empty_rows += self.segment_rows
            if empty_rows >= 2 * max(1, self.order.epoch_rows(e, self.rank)):
                raise RuntimeError(
                    f"the training data gives no full global batch: {empty_rows} rows of rank "
                    f"{self.rank}'s stream gave no {self.batch_size} decodable, selected rows; "
                    "add data or lower batch_size/workers")
            scale *= 2  # rows too sparse for one batch: read more next time


def rank_stream(data: "TrainData | ray.ObjectRef", *, rank: int, world: int, batch_size: int,
                position: tuple[int, int]) -> RankStream:
    """The loop's stream (``data``: the TrainData, or run.py's object-store reference to it:
    the file list and row counts travel once per node, not in every worker's config)."""
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    return RankStream(data, rank=rank, world=world, batch_size=batch_size, position=position)


def _library_spec(cfg) -> str | None:
    """``cfg.init_from`` when it is a library model (HF dir, ``open_clip:``), whose tokenizer the
    workers load from it; None for ours (fresh or init_from), shipped as tokenizer files."""
    from align_ray.model.finetune import kind_of

    return cfg.init_from if cfg.init_from and kind_of(cfg) != "ours" else None


def build_dataset(cfg, paths: list[str], selection: Selection, *, train: bool = False,
                  tokenizer: dict[str, bytes], counter: str | None = None,
                  with_match: bool = False, concurrency: int | None = None,
                  num_cpus: float | None = None) -> "ray.data.Dataset":
    """Lazy Dataset of preprocessed samples in file order (evaluation / validation; training
    reads through :class:`RankStream`).  ``train=True`` applies the training augmentation."""
    fs, files = resolve_inputs(paths)
    kwargs, key = _preprocess_kwargs(cfg, selection, train=train, tokenizer=tokenizer,
                                     counter=counter, with_match=with_match)
    cols = list(dict.fromkeys([cfg.image_col, cfg.text_col, *selection.columns(),
                               *([kwargs["match_col"]] if kwargs["match_col"] else [])]))
    ds = ray_env.read_parquet(files, filesystem=fs, columns=cols)
    return ds.map_batches(
        preprocess_nonempty, fn_kwargs=dict(cache_key=key, **kwargs),
        batch_size=cfg.data_batch_size, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency or cfg.data_workers),
        num_cpus=cfg.data_cpus if num_cpus is None else num_cpus,
    )
