"""``train_loop_per_worker``: the contrastive training loop that every Ray Train worker runs.

Per step: next batch of the rank's own Ray Data stream (ingest.RankStream: a deterministic order,
decoded/augmented/tokenized upstream) -> both
towers (bf16 autocast on GPU) -> loss against the embeddings gathered from all workers (local loss +
gather with grad) -> backward (DDP averages) -> clip -> optimizer + schedule step (step.py; with
``accum_steps`` > 1 one step takes that many batches, GradCache).  Rank 0 logs
metrics every ``log_every`` steps and runs the validation retrieval eval every ``eval_every``;
checkpoints every ``checkpoint_every`` steps and at the end (see checkpoint.py for the data position).
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from align_ray.model import DualEncoder, build_loss, finetune, unwrap
from align_ray.train import checkpoint as ckpt_lib
from align_ray.train import step as step_lib
from align_ray.train import syncbn
from align_ray.train.config import TrainConfig
from align_ray.train.evaluate import retrieval_metrics
from align_ray.model.transforms import image_norm
from align_ray.train.ingest import rank_stream
from align_ray.train.order import same_file_fraction, uniform_same_file_fraction
from align_ray.train.metrics import MetricsLogger
from align_ray.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def _all_agree(have_batch: bool, device: torch.device) -> bool:
    """True when every rank has a batch (epochs end on all ranks at the same step)."""
    flag = torch.tensor([1 if have_batch else 0], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gather_position(pos: tuple[int, int], device: torch.device) -> list[list[int]]:
    """Every rank's data position (epoch, offset), in rank order (order.DataOrder)."""
    t = torch.tensor(pos, dtype=torch.int64, device=device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [[int(pos[0]), int(pos[1])]]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [[int(x) for x in o.cpu().tolist()] for o in out]


def _gather_rng() -> list[dict]:
    state = ckpt_lib.rng_state()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [state]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def _same_file_pairs(micro: list[dict], world: int, device: torch.device) -> float | None:
    """Fraction of the row pairs of this step's global batch that come from the same input file
    (every rank's ``src_file``, gathered; a collective, so every rank calls it)."""
    if not micro or "src_file" not in micro[0]:
        return None
    src = torch.cat([torch.as_tensor(b["src_file"]).long() for b in micro]).to(device)
    if world > 1:
        parts = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(parts, src)
        src = torch.cat(parts)
    return same_file_fraction(src.cpu().numpy())


def _gpu_memory(device: torch.device) -> dict[str, float]:
    """This rank's peak CUDA memory so far (GiB): what decides batch_size and accum_steps on a
    GPU (GradCache's point); nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def wants_sync_bn(model: torch.nn.Module, cfg: TrainConfig, world: int) -> bool:
    """``cfg.sync_bn``, or (None = auto) a multi-worker GPU run whose model has BatchNorm.  Not
    auto on CPU: there every BatchNorm layer adds a gloo round trip per pass, a lock-step that
    a busy CPU box pays dearly for (BENCHMARKS.md "Training quality"), while per-worker
    statistics cost little quality at small batches (same section)."""
    if world < 2:
        return False
    if cfg.sync_bn is not None:
        return bool(cfg.sync_bn)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return bool(cfg.use_gpu and has_bn)


def maybe_sync_bn(model: torch.nn.Module, cfg: TrainConfig, world: int,
                  device: torch.device) -> torch.nn.Module:
    """BatchNorm -> synchronised BatchNorm when :func:`wants_sync_bn`: torch's SyncBatchNorm on
    GPUs (timm's converter, which also keeps its fused BatchNorm+activation layers' activation),
    train/syncbn.py's gloo one on CPU (torch's has no CPU kernel)."""
    if not wants_sync_bn(model, cfg, world):
        return model
    if device.type == "cpu":
        return syncbn.convert(model, syncbn.new_group())
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


class Normalize:
    """uint8 [B,3,S,S] from the data workers -> float32 normalised with the model's mean/std."""

    def __init__(self, model_cfg, device: torch.device) -> None:
        mean, std = image_norm(model_cfg)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.device = device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(self.device, non_blocking=True).float() - self.mean) / self.std


def _validate(model: DualEncoder, shard, device: torch.device, cfg: TrainConfig, amp) -> dict:
    model.eval()
    norm = Normalize(cfg.model, device)
    imgs, txts, match = [], [], []
    with torch.no_grad(), amp():
        for b in shard.iter_torch_batches(batch_size=cfg.eval_batch_size, device="cpu"):
            imgs.append(model.encode_image(norm(b["pixels"])).float().cpu().numpy())
            txts.append(model.encode_text(b["input_ids"].to(device),
                                          b["attention_mask"].to(device)).float().cpu().numpy())
            match.append(b["match_id"].numpy())
    model.train()
    if not imgs:
        return {}
    m = retrieval_metrics(np.concatenate(imgs), np.concatenate(txts), np.concatenate(match))
    out = {"val/n": m["n"]}
    for direction in ("image_to_text", "text_to_image"):
        for k, v in m[direction].items():
            out[f"val/{direction}/{k}"] = v
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    t_start = time.perf_counter()
    cfg: TrainConfig = config["cfg"]
    step_hook: Callable[[int, int], None] | None = config.get("step_hook")
    # debug: data_hook(step, rank, batches) sees each step's batches (tests/train/test_order)
    data_hook: Callable[[int, int, list], None] | None = config.get("data_hook")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = bool(cfg.bf16 and device.type == "cuda")

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    # a fresh DualEncoder, or the --init-from model (ours, HF, open_clip) with its own weights
    model = maybe_sync_bn(finetune.build_model(cfg, config["vocab_size"]), cfg, world, device)
    counts = finetune.prepare_for_training(model, cfg)  # locks after SyncBN swapped the modules
    if rank == 0:
        log.info("train: %(trainable)d trainable, %(locked)d locked parameter tensors", counts)
        if cfg.freeze_bn_stats:
            (log.info if counts["bn_frozen"] else log.warning)(
                "train: freeze_bn_stats: %d image-tower BatchNorm layers at their loaded "
                "statistics", counts["bn_frozen"])
    ddp = ray.train.torch.prepare_model(model)
    core = unwrap(ddp)
    optimizer = build_optimizer(core, cfg, finetune.kind_of(cfg))
    scheduler = build_scheduler(optimizer, cfg)
    loss_fn = build_loss(cfg.model, core)
    G = cfg.global_batch

    state, history = ckpt_lib.TrainState(global_batch=G, world_size=world), []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state, history = ckpt_lib.load(d, model=core, optimizer=optimizer,
                                           scheduler=scheduler, rank=rank)
        state.restarts += 1
        state.resumed_from_step = state.step
        if state.global_batch != G:
            log.warning("resuming with global batch %d (checkpoint: %d)", G, state.global_batch)
            state.global_batch = G
        state.world_size = world
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank dropout streams
        np.random.seed(cfg.seed * 1000 + rank)

    logger = None
    if rank == 0:
        logger = MetricsLogger(cfg.output, history=history,
                               purge_step=state.step + 1 if resume is not None else None)
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val") else None
    params = [p for p in ddp.parameters() if p.requires_grad]
    normalize = Normalize(cfg.model, device)

    def inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (normalize(batch["pixels"]), batch["input_ids"].to(device, non_blocking=True),
                batch["attention_mask"].to(device, non_blocking=True))

    # this rank's rows in the deterministic order, from its checkpointed position (ingest.py)
    # batch_size, or (elastic, fewer workers than configured) this rank's share of the fixed
    # global batch G
    B = cfg.rank_batch(world)
    if B != cfg.batch_size:
        log.warning("train: elastic: %d of %d workers share the global batch %d: %d rows each",
                    world, cfg.workers, G, B)
    stream = rank_stream(config.get("train_data"), rank=rank, world=world, batch_size=B,
                         position=ckpt_lib.rank_position(state, rank, world),
                         accum_steps=cfg.accum_steps)
    uniform_mix = uniform_same_file_fraction(stream.order.rows)
    win = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter()}
    last: dict[str, Any] = {}
    ddp.train()
    while state.step < cfg.steps:
        batches = stream.batches((cfg.steps - state.step) * cfg.accum_steps)
        steps_in_epoch = 0
        while state.step < cfg.steps:
            t_wait = time.perf_counter()
            micro = step_lib.take(batches, cfg.accum_steps)  # accum_steps batches, or None
            if not _all_agree(micro is not None, device):
                break
            win["wait"] += time.perf_counter() - t_wait
            # forward, loss, backward (GradCache over the micro-batches), clip, optimizer step
            res = step_lib.train_step(ddp, loss_fn, micro, inputs, optimizer, scheduler, params,
                                      cfg.grad_clip, amp)
            loss, grad_norm, lr = res.loss, res.grad_norm, res.lr
            state.step += 1
            steps_in_epoch += 1
            state.samples_seen += G
            state.epoch = stream.epoch
            if data_hook is not None:
                data_hook(state.step, rank, micro)
            win["loss"] += float(loss.detach())
            win["n"] += 1
            if step_hook is not None:
                step_hook(state.step, rank)

            final = state.step == cfg.steps
            if state.step % cfg.log_every == 0 or final:
                stats = torch.tensor([win["loss"], win["n"], win["wait"]], dtype=torch.float64,
                                     device=device)
                if world > 1:
                    dist.all_reduce(stats)
                elapsed = time.perf_counter() - win["t0"]
                n = max(1, win["n"])
                mix = _same_file_pairs(micro, world, device)
                last = {"step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen,
                        "loss": float(stats[0]) / float(stats[1]),
                        "temperature": float(core.temperature.detach()),
                        "lr": float(lr), "grad_norm": float(grad_norm),
                        "samples_per_s": win["n"] * G / max(elapsed, 1e-9),
                        "data_wait_s": float(stats[2]) / float(stats[1]),
                        "step_time_s": elapsed / n,
                        # since this worker started (model build and data start included)
                        "elapsed_s": time.perf_counter() - t_start,
                        # how correlated in-batch negatives are: pairs of this step's global
                        # batch from one file, vs uniform sampling (issue 13 part 2)
                        "mix/same_file_pairs": mix, "mix/same_file_pairs_uniform": uniform_mix,
                        **_gpu_memory(device)}
                if logger is not None:
                    logger.log(last)
                win = {"loss": 0.0, "n": 0, "wait": 0.0, "t0": time.perf_counter()}
            if val_shard is not None and rank == 0 and (
                    final or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                t_val = time.perf_counter()
                rec = _validate(core, val_shard, device, cfg, amp)
                if rec and logger is not None:
                    logger.log({"step": state.step, **rec, "val_s": time.perf_counter() - t_val,
                                "elapsed_s": time.perf_counter() - t_start})
                win["t0"] = time.perf_counter()
            if state.step % cfg.checkpoint_every == 0 or final:
                state.data_position = _gather_position(stream.position, device)
                rngs = _gather_rng()
                _report(state, last, rank, core, optimizer, scheduler, rngs,
                        logger.history if logger is not None else [])
        else:
            break  # steps reached inside this epoch
        if steps_in_epoch == 0:  # the stream ended at once (the real one never ends)
            raise RuntimeError(
                f"the training data gives no full global batch ({G} = {B} x "
                f"{world} x {cfg.accum_steps} decodable rows) in an epoch; add data or lower "
                "batch_size/workers/accum_steps")
    if logger is not None:
        logger.close()


def _report(state: ckpt_lib.TrainState, last: dict, rank: int, model, optimizer, scheduler,
            rngs: list[dict], history: list[dict]) -> None:
    metrics = {"step": state.step, "samples_seen": state.samples_seen, "epoch": state.epoch,
               "restarts": state.restarts, **{k: v for k, v in last.items() if k == "loss"}}
    name = f"step_{state.step:08d}" + (f"-r{state.restarts}" if state.restarts else "")
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="align-ckpt-") as d:
        ckpt_lib.save(d, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                      rng_states=rngs, metrics=history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=name)
