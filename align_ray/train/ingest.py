"""Ray Data ingest for training: parquet -> (decode, augment, tokenize on Ray Data CPU actors) ->
numpy ``pixels`` [n,3,S,S] **uint8** (crop/flip/resize done; the trainer normalises with the
model's mean/std on its device: 4x less data through the object store than float32), ``input_ids`` / ``attention_mask`` [n,L] int64, ``row_id`` int64
(and ``match_id`` int64 for validation sets).

* Inputs: a stage output DIR (its DIR/parquet), a parquet file, folder or glob; local or ``s3://``.
* ``row_id`` = 64-bit BLAKE2b of (caption, image bytes): a stable identity per sample that the
  checkpoint's data position uses to skip already-consumed samples on resume (checkpoint.py).
* Held-out rows (``val_fraction``) are chosen by a hash of the *caption*, so no validation caption
  is ever a training caption; the tokenizer is trained on training captions only.
* Decoding runs as Ray Data tasks (``TaskPoolStrategy(size=data_workers)``, ``data_cpus`` each)
  on the CPU workers, never in the trainers.
* Undecodable images are skipped, never fatal: each worker logs its count and the distinct row_ids
  are added to a named :class:`BadImageCounter` actor that ``run`` reads at the end.  ``run``
  pins that actor to the driver's node (a worker node's loss must not take the count with it)
  and treats a lost count as unknown, never as a failed run (``train/resilience.py``).
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

from align_ray import layout
from align_ray.model.tokenizer import load_tokenizer, train_wordpiece
from align_ray.model.transforms import decode_rgb, eval_transform, train_transform
from align_ray.model.transforms import image_norm  # noqa: F401 - loop.py's Normalize imports it here

log = logging.getLogger(__name__)
_BUCKETS = 1_000_000
MAX_STREAM_ROWS = 4_000_000


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


@dataclass(frozen=True)
class Selection:
    """Which rows of the input a dataset keeps: rows whose ``split_col`` equals ``split_value``,
    and/or the caption-hash holdout (``holdout=True`` keeps the held-out share, else the rest)."""

    split_col: str | None = None
    split_value: str | None = None
    holdout_fraction: float = 0.0
    holdout: bool = False

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
        return keep


def selections(cfg) -> tuple[tuple[list[str], Selection], tuple[list[str], Selection] | None]:
    """(train paths, selection), (val paths, selection) or None, per TrainConfig's val options."""
    if cfg.val_data:
        return (cfg.data, Selection()), (cfg.val_data, Selection())
    if cfg.split_col:
        return ((cfg.data, Selection(cfg.split_col, cfg.train_split)),
                (cfg.data, Selection(cfg.split_col, cfg.val_split)))
    if cfg.val_fraction > 0:
        return ((cfg.data, Selection(holdout_fraction=cfg.val_fraction, holdout=False)),
                (cfg.data, Selection(holdout_fraction=cfg.val_fraction, holdout=True)))
    return (cfg.data, Selection()), None


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
    ds = ray.data.read_parquet(files, filesystem=fs, columns=cols)
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
        self.transform = (train_transform(image_size, *ident, scale=tuple(crop_scale), flip=hflip)
                          if train
                          else eval_transform(image_size, *ident))
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
        pixels, ids, kept, bad = [], [], [], []
        for i in np.flatnonzero(keep):
            data = images[i]
            rid = row_id(texts[i], bytes(data) if data is not None else b"")
            try:
                if data is None or len(data) == 0:
                    raise ValueError("empty image")
                arr = self.transform(decode_rgb(bytes(data), max_pixels=self.max_pixels,
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


def count_rows(fs: pafs.FileSystem, files: list[str]) -> int:
    """Rows in ``files`` from the parquet footers (no data read)."""
    import pyarrow.dataset as pads

    return int(pads.dataset(files, filesystem=fs, format="parquet").count_rows())


def auto_stream_epochs(cfg, rows: int, remaining_samples: int) -> int:
    """Epochs one training execution streams: ``cfg.stream_epochs``, or (0 = auto) enough to
    cover ``remaining_samples`` with a 25% margin for rows the selection/decoder drop -- but at
    most ``MAX_STREAM_ROWS`` rows per execution, since the checkpoint's data position lists every
    id consumed in the current execution (8 bytes each; a restart per 4 M rows costs nothing)."""
    if cfg.stream_epochs:
        return int(cfg.stream_epochs)
    if rows <= 0:
        return 1
    return max(1, min(math.ceil(1.25 * remaining_samples / rows), MAX_STREAM_ROWS // rows))


def _read_files(batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem,
                columns: list[str], rows_per_block: int) -> Iterator[Any]:
    """``map_batches`` generator: each listed parquet file, streamed as small Arrow tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in batch["path"]:
        with filesystem.open_input_file(str(path)) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=rows_per_block, columns=columns):
                yield pa.Table.from_batches([rb])


def read_epochs(files: list[str], fs: pafs.FileSystem, columns: list[str], epochs: int,
                seed: int, rows_per_block: int = 256) -> "ray.data.Dataset":
    """A Dataset that streams ``epochs`` passes over ``files`` in ONE execution, each pass in its
    own seeded random file order (what ``FileShuffleConfig(reseed_after_execution)`` does once
    per execution).  ``read_parquet`` cannot repeat a file (it de-duplicates paths) and a union
    of per-epoch reads was measured at minutes to the first row, so the read is one task per
    (epoch, file) over ``from_items``."""
    rng = np.random.default_rng(seed)
    items = [{"path": files[i]} for _ in range(epochs) for i in rng.permutation(len(files))]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(filesystem=fs, columns=columns, rows_per_block=rows_per_block))


def _library_spec(cfg) -> str | None:
    """``cfg.init_from`` when it is a library model (HF dir, ``open_clip:``), whose tokenizer the
    workers load from it; None for ours (fresh or init_from), shipped as tokenizer files."""
    from align_ray.model.finetune import kind_of

    return cfg.init_from if cfg.init_from and kind_of(cfg) != "ours" else None


def build_dataset(cfg, paths: list[str], selection: Selection, *, train: bool,
                  tokenizer: dict[str, bytes], counter: str | None = None,
                  with_match: bool = False, concurrency: int | None = None,
                  num_cpus: float | None = None, epochs: int = 1) -> "ray.data.Dataset":
    """Lazy Dataset of preprocessed samples for training (``train=True``) or evaluation.

    Training streams ``epochs`` epochs per execution (:func:`read_epochs`), each in a new random
    file order; rows are mixed further by the loop's local shuffle buffer -- no all-to-all
    shuffle, so the first batch never waits for the whole dataset to be read."""
    fs, files = resolve_inputs(paths)
    match_col = cfg.val_match_col if with_match else None
    cols = list(dict.fromkeys([cfg.image_col, cfg.text_col, *selection.columns(),
                               *([match_col] if match_col else [])]))
    if train:
        ds = read_epochs(files, fs, cols, epochs, seed=cfg.seed, rows_per_block=cfg.data_batch_size)
    else:
        ds = ray.data.read_parquet(files, filesystem=fs, columns=cols)
    kwargs = dict(
        image_col=cfg.image_col, text_col=cfg.text_col, selection=selection,
        image_size=cfg.model.image_size, train=train,
        tokenizer=tokenizer, max_length=cfg.model.max_length,
        max_pixels=cfg.max_image_pixels, match_col=match_col, with_match=with_match,
        counter=counter, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
        text_spec=_library_spec(cfg))
    key = hashlib.sha1(repr(sorted((k, v) for k, v in kwargs.items() if k != "tokenizer"))
                       .encode() + b"".join(tokenizer[k] for k in sorted(tokenizer))).hexdigest()
    return ds.map_batches(
        preprocess_batch, fn_kwargs=dict(cache_key=key, **kwargs),
        batch_size=cfg.data_batch_size, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency or cfg.data_workers),
        num_cpus=cfg.data_cpus if num_cpus is None else num_cpus,
    )
