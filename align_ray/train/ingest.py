"""Ray Data ingest for training: parquet -> (decode, augment, tokenize on Ray Data CPU tasks:
``train/preprocess.py``) -> numpy ``pixels`` [n,3,S,S] **uint8** (4x less data through the
object store than float32: the trainer normalises on its device), tokens, ``row_id``.  Which
rows: ``train/selection.py``; in which order: ``train/order.py``.

* Inputs: a stage output DIR (its DIR/parquet), a parquet file, folder or glob; local or ``s3://``.
* The tokenizer is trained on training captions only (held-out captions never reach it).
* Decoding runs as Ray Data tasks (``data_cpus`` each) on the CPU workers, never in the trainers.
* Undecodable images are skipped, never fatal: each worker logs its count and the distinct row_ids
  are added to a named ``preprocess.BadImageCounter`` actor that ``run`` reads at the end.  ``run``
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
* ``resampled`` (open_clip's ``--dataset-resampled``): every epoch is one freshly drawn window;
  on small data (one-row slices) the reader ends a draw at its ``batch_size x accum_steps``-th
  selected row, so each step's batch is one draw (an undecodable row among them is filled from
  the next draw, which may then repeat a row within that batch).

The pipeline per rank: ``from_items`` (one item per window) -> one reader task at a time
(``train/reader.py``; 0 CPU: reads the window's slices, only the row groups they overlap, and
emits the rows in window order in blocks of ``data_batch_size``; resampled one-step draws go
``DRAWS_PER_TASK`` to a task, which reads the data once for them) -> ``ceil(data_workers /
workers)`` decode/augment/tokenize tasks (``data_cpus`` each), with ``preserve_order`` so
blocks arrive in stream order.  One
execution covers the rest of the epoch (or what the run still needs, if more); the next starts
exactly after the last batch handed out.  Costs: a window's rows sit in the reader's memory at
once (``shuffle_buffer`` x row bytes); a slice smaller than its parquet row group reads the whole
group (write training shards with row groups of <= ``SLICE_ROWS`` rows); the world size is part
of the order (a resume on a different number of workers restarts at the next epoch).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray

from align_ray import layout, ray_env
from align_ray.model.tokenizer import load_tokenizer, train_wordpiece
from align_ray.train.order import SLICE_ROWS, DataOrder
from align_ray.train.reader import read_windows
from align_ray.train.preprocess import preprocess_batch, preprocess_nonempty
from align_ray.train.selection import Selection


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


def check_columns(cfg, train: tuple[list[str], Selection],
                  val: tuple[list[str], Selection] | None) -> None:
    """Sets ``cfg.image_col`` when it is None (``jpg`` if the first input has one, else
    ``image``), then raises ValueError, before any Ray work, when an input of
    ``selection.selections(cfg)`` lacks a column that the config names, its image column holds
    no bytes, or its split column holds no row of the split asked for.  Otherwise the first
    sign is an error in every Ray Train worker, after the whole worker group has started, and
    Ray Train retries it as if it might pass."""
    hint = "set --image-col / --text-col (and --split-col / --val-match-col where used)"
    listed: dict[str, tuple] = {}  # path -> (fs, files): each path is listed once
    counted: dict[tuple, dict[str, int]] = {}  # (split col, files) -> value counts, read once

    def files_of(path):
        if path not in listed:
            listed[path] = layout.parquet_files(path)
        return listed[path]

    def split_counts(col_name, fs, files):
        key = (col_name, tuple(files))
        if key not in counted:  # one column read: small beside the tokenizer's caption scan
            col = pads.dataset(files, filesystem=fs).to_table(columns=[col_name])[0]
            counted[key] = {str(v["values"]): v["counts"]  # Selection.mask compares str(value)
                            for v in pc.value_counts(col).to_pylist()}
        return counted[key]

    if not train[0]:
        resolve_inputs([])  # raises: no input data given
    if cfg.image_col is None:  # resolved once, here, from the first training input
        fs, files = files_of(train[0][0])
        cfg.image_col = layout.default_image_col(layout.schema_of(fs, files).names)
    for (paths, sel), extra in ((train, []), *([(val, [cfg.val_match_col])] if val else [])):
        if not paths:
            resolve_inputs(paths)
        fs0, values = None, {}
        for path in paths:
            fs, files = files_of(path)
            if fs0 is not None and type(fs) is not type(fs0):
                raise ValueError("all inputs must be on one filesystem (all local or all s3://)")
            fs0 = fs
            layout.require_columns(path, layout.schema_of(fs, files),
                                   [cfg.image_col, cfg.text_col, *sel.columns(), *extra], hint,
                                   image_col=cfg.image_col)
            if sel.split_col:
                for k, n in split_counts(sel.split_col, fs, files).items():
                    values[k] = values.get(k, 0) + n
        if sel.split_col and not values.get(sel.split_value):
            seen = ", ".join(f"{k!r} ({n} rows)" for k, n in
                             sorted(values.items(), key=lambda kv: -kv[1])[:8])
            raise ValueError(f"{', '.join(paths)}: no row has {sel.split_col} == "
                             f"{sel.split_value!r}; its values: {seen or 'none'}; "
                             "set --train-split / --val-split")


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
    return train_wordpiece(_Captions(paths, cfg.text_col, selection), cfg.model.vocab_size,
                           cfg.model.max_length)


class _Captions:
    """The captions as an iterable that streams them again on each pass (the WordPiece trainer
    makes two), rather than listing every caption on the driver."""

    def __init__(self, paths: list[str], text_col: str, selection: Selection):
        self.args = (paths, text_col, selection)

    def __iter__(self) -> Iterator[str]:
        return iter_texts(*self.args)


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


DRAWS_PER_TASK = 16  # resampled one-step draws per read task (RankStream.dataset)


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
    resampled: bool | None = None

    def order(self, world: int, draw_rows: int = 0) -> DataOrder:
        return DataOrder(self.rows, seed=self.seed, world=world, window_rows=self.window_rows,
                         slice_rows=self.slice_rows, resampled=self.resampled,
                         draw_rows=draw_rows)


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
        color_jitter=cfg.color_jitter, grayscale=cfg.grayscale, word_drop=cfg.caption_word_drop,
        style=cfg.style_aug, text_spec=_library_spec(cfg))
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
                     stream_epochs=int(cfg.stream_epochs), resampled=cfg.resampled)


class RankStream:
    """One rank's training batches, in the deterministic order of :class:`DataOrder`, from a
    position on.  Each Ray Data execution ("segment") covers the rest of the current epoch, or
    the rows the rest of the run needs (+25 % for dropped rows) when more (``stream_epochs`` > 0:
    that many of the rank's epochs); when one
    ends, its trailing partial batch is dropped and the next starts at the exact position after
    the last batch handed out, so segment boundaries never change which rows form a batch.
    ``position`` is (epoch, offset) after the last batch handed out."""

    def __init__(self, data: TrainData, *, rank: int, world: int, batch_size: int,
                 position: tuple[int, int] = (0, 0), accum_steps: int = 1) -> None:
        self.data, self.rank, self.world, self.batch_size = data, rank, world, batch_size
        # a resampled draw is one optimizer step's rows of the rank (all its micro-batches)
        self.order = data.order(world, draw_rows=batch_size * accum_steps)
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
        self.segment_rows = sum(self.order.rows_out(sum(it["len"]) - it["skip"]) for it in items)
        # one window per read task; resampled one-step draws (DataOrder.take) DRAWS_PER_TASK
        # per task, which then read the data once for all of them
        per_task = DRAWS_PER_TASK if self.order.take else 1
        ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_task))
        ds.context.execution_options.preserve_order = True  # (the pipeline shares this context)
        ds = ds.map_batches(
            read_windows, batch_size=per_task, batch_format="numpy",
            fn_kwargs=dict(filesystem=d.filesystem, columns=d.columns,
                           seed=d.seed, rank=self.rank, rows_per_block=d.rows_per_block,
                           take=self.order.take, text_col=d.preprocess["text_col"],
                           selection=d.preprocess["selection"]),
            compute=ray.data.TaskPoolStrategy(size=1), num_cpus=0,
            # Ray's own default (no limit on a worker's calls), stated so that the reader stays
            # an operator of its own: Ray Data (2.60) fuses two task maps of equal pool size and
            # equal remote arguments (one decode task per rank, the common case) and bundles the
            # fused task's input to the decoder's batch size, 64 windows: a segment's reading
            # and decoding ran in one task, and the first batch came only when the whole segment
            # was decoded (tests/train/test_ingest.py).  A named parameter: ``ray_remote_args``
            # such as ``max_retries`` warn that they go away in Ray 2.64.
            max_calls=0)
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
                position: tuple[int, int], accum_steps: int = 1) -> RankStream:
    """The loop's stream (``data``: the TrainData, or run.py's object-store reference to it:
    the file list and row counts travel once per node, not in every worker's config)."""
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    return RankStream(data, rank=rank, world=world, batch_size=batch_size, position=position,
                      accum_steps=accum_steps)


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
