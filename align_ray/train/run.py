"""``run(cfg) -> dict``: tokenizer -> Ray Data ingest -> ``TorchTrainer.fit`` -> export + final eval.

Writes OUTPUT/model (``save_pretrained``), OUTPUT/metrics.jsonl, OUTPUT/tb (TensorBoard events),
OUTPUT/curves.png and OUTPUT/eval.json; checkpoints live under ``storage_path/name``.  Running
again with the same (storage_path, name) resumes from the latest checkpoint (Train V2: no
``resume_from_checkpoint``; the tokenizer saved next to the checkpoints is reused so token ids
never change across a resume).

OUTPUT may be an ``s3://`` URI: nothing then assumes a disk shared between nodes.  Checkpoints go
to OUTPUT/checkpoints through Ray Train's storage filesystem; rank 0 (on whatever node) keeps
metrics.jsonl and tb/ in a local scratch folder and copies them to the URI as it goes
(metrics.MetricsLogger); the driver builds model/, curves.png and eval.json in its own scratch
folder and uploads them, eval.json last (the "finished" marker the workflow checks).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train.torch import TorchTrainer

from align_ray import storage
from align_ray.model import finetune
from align_ray.model.dual_encoder import check_towers
from align_ray.train import checkpoint as ckpt_lib
from align_ray.train import ingest, lr_find, preprocess, resilience, selection
from align_ray.train.config import TrainConfig
from align_ray.train.eval_parquet import EvalConfig, evaluate
from align_ray.train.loop import train_loop_per_worker
from align_ray.train.metrics import plot_curves

log = logging.getLogger(__name__)


def cpus_needed(cfg: TrainConfig) -> float:
    """CPUs training asks Ray for at once: the train workers plus the data tasks feeding them
    (each rank runs its own pipeline: ``data_workers`` shared out, at least one task per rank)."""
    return (cfg.workers * cfg.cpus_per_worker
            + cfg.workers * ingest.data_tasks_per_rank(cfg) * cfg.data_cpus)


def fit_to_cluster(cfg: TrainConfig, cluster_cpus: float | None = None) -> TrainConfig:
    """Shrink ``cpus_per_worker`` and ``data_cpus`` in proportion when the cluster has fewer free
    CPUs than :func:`cpus_needed` (e.g. the defaults on a 2-core machine).

    Train's workers hold their CPUs for the whole run; a data task that cannot get a CPU then
    never runs and training waits for ever on its first batch.  Fractional CPUs keep every
    process schedulable.  A cluster with 0 free CPUs (an autoscaling head with no workers yet)
    is left alone: its nodes are still to come.  Returns ``cfg`` (changed in place)."""
    if cluster_cpus is None:  # free CPUs: a Serve app or another job may hold part of them
        cluster_cpus = float(ray.available_resources().get("CPU", 0))
    need = cpus_needed(cfg)
    if cluster_cpus <= 0 or need <= cluster_cpus + 1e-9:
        return cfg
    scale = cluster_cpus / need
    # rounded down to 1/1000 CPU: Ray's fixed-point accounting must not round the sum up past
    # what is free
    cpw, dcpu = (math.floor(v * scale * 1000) / 1000 for v in (cfg.cpus_per_worker, cfg.data_cpus))
    log.warning("train: %g workers x %g CPU + %d data tasks x %g CPU do not fit the cluster's "
                "%g CPUs; using %.3g CPU per worker and %.3g per data task",
                cfg.workers, cfg.cpus_per_worker, cfg.workers * ingest.data_tasks_per_rank(cfg),
                cfg.data_cpus,
                cluster_cpus, cpw, dcpu)
    cfg.cpus_per_worker, cfg.data_cpus = cpw, dcpu
    return cfg


def ensure_ray(address: str | None = None) -> None:
    """Join/start Ray (through :func:`align_ray.ray_env.init`) for ``align-ray train`` and the
    workflow alike.  A local start has the machine's real CPU count (over-subscribed logical
    CPUs hide deadlocks that every small machine then hits); :func:`fit_to_cluster` sizes the
    run to it."""
    from align_ray import ray_env

    if not ray.is_initialized():
        ray_env.init(address)


def _tokenizer(cfg: TrainConfig, paths: list[str], sel: selection.Selection) -> tuple[Any, dict]:
    """The run's tokenizer, saved under storage_path/name/tokenizer on first use and reused."""
    fs, base = storage.filesystem(cfg.resolved_storage())
    tdir = storage.join(base, cfg.name, "tokenizer")
    if storage.exists(fs, tdir):
        files = {posixpath_name(p): storage.read_bytes(fs, p) for p in storage.list_files(fs, tdir)}
        return preprocess.tokenizer_from_files(files, cfg.model.max_length), files
    tok = ingest.build_tokenizer(cfg, paths, sel)
    files = preprocess.tokenizer_files(tok)
    for name, data in files.items():
        storage.write_bytes(fs, storage.join(tdir, name), data)
    return tok, files


def posixpath_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {}),
            **{k: float(v) for k, v in cfg.worker_resources.items()}}


def build_trainer(cfg: TrainConfig, datasets: dict, vocab_size: int,
                  step_hook: Callable[[int, int], None] | None = None, *,
                  train_data: ingest.TrainData,
                  data_hook: Callable[[int, int, list], None] | None = None) -> TorchTrainer:
    uri = cfg.resolved_storage()
    fs_kwargs: dict[str, Any] = {}
    if uri.startswith("s3://"):
        fs, path = storage.filesystem(uri)
        fs_kwargs = {"storage_path": path, "storage_filesystem": fs}
    else:
        fs_kwargs = {"storage_path": uri}
    resilience.controller_polls()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "vocab_size": vocab_size, "has_val": "val" in datasets,
                           "step_hook": step_hook, "data_hook": data_hook,
                           # in the object store: 1.8 M file names are not pickled per worker
                           "train_data": ray.put(train_data)},
        scaling_config=ray.train.ScalingConfig(
            # elastic: any group size in [min_workers, workers] (the global batch is fixed)
            num_workers=(cfg.min_workers, cfg.workers) if cfg.min_workers else cfg.workers,
            elastic_resize_monitor_interval_s=cfg.elastic_resize_interval_s,
            use_gpu=cfg.use_gpu, resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            # bounded wait for a worker group (never a silent hang after losing nodes)
            failure_config=resilience.failure_config(cfg.max_failures,
                                                     elastic=bool(cfg.min_workers)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            **fs_kwargs),
        # training data: each rank builds its own pipeline from train_data (ingest.RankStream);
        # "val" (materialised, rank 0 reads it) is not split
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def check(cfg: TrainConfig) -> None:
    """Everything about ``cfg`` that can be refused before Ray starts, with one line each
    (ValueError: the CLI's exit 2): ``init_from`` (and the source's settings taken into
    ``cfg.model``), the inputs and their columns and splits (``cfg.image_col`` resolved), the
    towers' names and files.  Each of these otherwise failed in every Ray Train worker, after the
    group had started, and Ray Train retried it as if it might pass."""
    if not cfg.output:
        raise ValueError("output is required")
    finetune.prepare(cfg)  # --init-from: the source's architecture, preprocessing and loss
    ingest.check_columns(cfg, *selection.selections(cfg))
    if not cfg.init_from:
        check_towers(cfg.model)


def run(cfg: TrainConfig, *, step_hook: Callable[[int, int], None] | None = None,
        address: str | None = None,
        data_hook: Callable[[int, int, list], None] | None = None) -> dict[str, Any]:
    """Train (or resume) and export; returns final metrics and paths.  ``step_hook(step, rank)``
    and ``data_hook(step, rank, batches)`` run on the workers after each step (tests)."""
    check(cfg)
    remote = storage.is_uri(cfg.output)
    if remote:  # built here, uploaded at the end (a URI is never a local path on any node)
        cfg.output = cfg.output.rstrip("/")
        out = Path(tempfile.mkdtemp(prefix="align-ray-train-"))
    else:
        out = Path(os.path.abspath(os.path.expanduser(cfg.output)))
        out.mkdir(parents=True, exist_ok=True)
        cfg.output = str(out)
    try:
        summary = _run(cfg, out, step_hook=step_hook, address=address, data_hook=data_hook)
        if remote:
            storage.upload_dir(out, cfg.output, skip=("tb",), last="eval.json")
            summary = {k: v.replace(str(out), cfg.output) if isinstance(v, str) else v
                       for k, v in summary.items()}
        return summary
    finally:
        if remote:
            shutil.rmtree(out, ignore_errors=True)


def _run(cfg: TrainConfig, out: Path, *, step_hook, address, data_hook) -> dict[str, Any]:
    ensure_ray(address)
    fit_to_cluster(cfg)
    t0 = time.perf_counter()
    (train_paths, train_sel), val = selection.selections(cfg)   # checked by run() -> check()
    if cfg.init_from:  # the source's own tokenizer (None for a library model: ingest loads it)
        tokenizer, tok_files = finetune.source_tokenizer(cfg)
    else:
        tokenizer, tok_files = _tokenizer(cfg, train_paths, train_sel)
    vocab_size = len(tokenizer) if tokenizer is not None else 0
    log.info("train: tokenizer (%d tokens) ready in %.1fs", vocab_size, time.perf_counter() - t0)

    counter_name = f"align-bad-images-{uuid.uuid4().hex[:8]}"
    # on the driver's node: a counter on a worker node that dies would fail a finished run
    counter = preprocess.BadImageCounter.options(
        name=counter_name, scheduling_strategy=resilience.on_driver_node()).remote()
    train_data = ingest.train_data(cfg, train_paths, train_sel, tokenizer=tok_files,
                                   counter=counter_name)
    order = train_data.order(cfg.workers)
    if order.resampled:
        log.info("train: %d file(s), %d rows; resampled: each epoch a fresh draw of one "
                 "window of %d slices of <= %d rows%s", len(train_data.files), order.total,
                 order.window_slices, order.slice_rows,
                 ", cut to one step's rows" if order.slice_rows == 1 else "")
    else:
        log.info("train: %d file(s), %d rows; per epoch a seeded order of %d slices of <= %d "
                 "rows, rows shuffled in windows of %d slices", len(train_data.files),
                 order.total, len(order.slice_len), order.slice_rows, order.window_slices)
    datasets: dict[str, Any] = {}
    if val is not None:
        # Preprocessed once, before training: periodic evals then read the object store and never
        # compete with the training pipeline's actors for CPUs.
        datasets["val"] = ingest.build_dataset(
            cfg, val[0], val[1], train=False, tokenizer=tok_files, counter=counter_name,
            with_match=True, concurrency=1).limit(cfg.val_max_rows).materialize()
    log.info("train: datasets ready in %.1fs", time.perf_counter() - t0)
    try:
        trainer = build_trainer(cfg, datasets, vocab_size, step_hook, train_data=train_data,
                                data_hook=data_hook)
        result = resilience.fit(trainer, cfg.workers, worker_resources(cfg))
        bad = resilience.read_count(counter, "undecodable-image")
    finally:
        try:
            ray.kill(counter)
        except ray.exceptions.RayActorError:  # already gone with its node: nothing to free
            pass
    log.info("train: fit done in %.1fs", time.perf_counter() - t0)
    if bad:
        log.warning("train: skipped %d undecodable training/validation image(s)", bad)
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    model = finetune.build_model(cfg, vocab_size)
    with result.checkpoint.as_directory() as d:
        state, history = ckpt_lib.load(d, model=model)
    # in the source's format: ours, HF save_pretrained (+ processor) or an open_clip folder
    model_dir = finetune.save_model(model, cfg, tokenizer, str(out / "model"))
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    curves = plot_curves(history, out / "curves.png")
    found = lr_find.write(history, out) if cfg.schedule == "range_test" else None
    if found:
        log.info("train: range test: suggested lr %.3g (steepest descent), %.3g (min loss / 10)",
                 found["suggested_lr"], found["min_loss_lr_div10"])

    final: dict[str, Any] = {}
    if val is not None:
        final = evaluate(EvalConfig(model=model_dir, data=val[0], image_col=cfg.image_col,
                                    text_col=cfg.text_col, match_col=cfg.val_match_col,
                                    max_rows=cfg.val_max_rows), selection=val[1])
    log.info("train: export + final eval done in %.1fs", time.perf_counter() - t0)
    train_logs = [m for m in history if "loss" in m]
    summary = {
        "step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
        "global_batch": state.global_batch, "restarts": state.restarts,
        "resumed_from_step": state.resumed_from_step, "bad_images_skipped": bad,
        "data_position": state.data_position,
        "final_loss": train_logs[-1]["loss"] if train_logs else None,
        "temperature": train_logs[-1]["temperature"] if train_logs else None,
        "eval": final, "model_dir": model_dir, "output": str(out),
        "metrics": str(out / "metrics.jsonl"), "curves": str(curves) if curves else None,
        "checkpoint": result.checkpoint.path,
    }
    if found:
        summary["lr_find"] = {k: v for k, v in found.items() if k != "curve"}
    (out / "eval.json").write_text(json.dumps(
        {**final, "step": state.step, "samples_seen": state.samples_seen}, indent=1))
    return summary
