"""Training equivalence: 3 full optimizer steps on 2 gloo workers x B give the parameters of
1 process x 2B (float64).

Both sides run the real step (``align_ray.train.step.train_step``: zero_grad, forward, the
gathered-negative loss, backward, global-norm clipping, optimizer and schedule step) with the real
builders (``build_loss``, ``optim.build_optimizer`` / ``build_scheduler``: AdamW with its
decay/no-decay groups, warm-up then linear decay) and ``grad_clip`` small enough that every step
clips.  The workers wrap the model in DDP like Ray Train's ``prepare_model``.  The data is three
fixed batches fed to the step directly: no augmentation, a fixed order (rank r takes rows
[r*B, (r+1)*B) of each global batch, the concatenation the gathered loss sees).  Cases: 2 x B
(``accum_steps`` 1), 2 x B/2 x 2 micro-batches (GradCache under DDP) and 1 x B x 2 (GradCache in
one process), each for InfoNCE and SigLIP.

BatchNorm is frozen (eval mode; dropout is 0) in that test: GradCache normalises per
micro-batch by design.  The second test runs BatchNorm in train mode (batch statistics):
2 x B with ``sync_bn`` (train/syncbn.py, which runs on gloo/CPU) gives the parameters and running
statistics of 1 x 2B, and without it they differ (each worker normalised over its own B rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from align_ray.model import build_loss
from align_ray.train import step as step_lib
from align_ray.train import syncbn
from align_ray.train.config import TrainConfig
from align_ray.train.optim import build_optimizer, build_scheduler
from tests.train import dist_helpers as h

W, B, STEPS, LR, CLIP = 2, 4, 3, 1e-3, 0.02
KINDS = ("clip", "siglip")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # like a training worker; 2 OpenMP threads crawl on a loaded box
    yield
    torch.set_num_threads(n)


def _cfg(kind: str, workers: int, batch_size: int, accum: int) -> TrainConfig:
    return TrainConfig(data=["x"], workers=workers, batch_size=batch_size, accum_steps=accum,
                       steps=STEPS, warmup_steps=1, lr=LR, optimizer="adamw", schedule="linear",
                       grad_clip=CLIP, loss="siglip" if kind == "siglip" else "infonce",
                       model=h.model_cfg(kind))


def train(kind: str, state: dict, data: list, *, workers: int, batch_size: int, accum: int,
          rank: int = 0, ddp: bool = False, bn: str = "frozen") -> dict:
    """STEPS real steps; this rank's rows of each global batch, as ``accum`` micro-batches.
    ``bn``: "frozen" (running statistics), "batch" (train mode, this process's rows) or "sync"
    (train mode, statistics over every rank: syncbn.convert, as the training loop does)."""
    cfg = _cfg(kind, workers, batch_size, accum)
    assert cfg.global_batch == W * B
    model = h.build(kind, state)
    if bn != "frozen":
        model.train()
    if bn == "sync":
        model = syncbn.convert(model, syncbn.new_group())
    wrapped = DDP(model) if ddp else model
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    loss_fn = build_loss(model.cfg, wrapped)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    n = batch_size * accum  # rows per rank per step
    log = {"loss": [], "grad_norm": [], "lr": []}
    for batch in data:
        local = h.rows(batch, slice(rank * n, (rank + 1) * n))
        res = step_lib.train_step(wrapped, loss_fn, h.split(local, accum), h.inputs, optimizer,
                                  scheduler, params, cfg.grad_clip)
        loss = res.loss.clone()
        if ddp:
            dist.all_reduce(loss)
        log["loss"].append(loss.item() / workers)
        log["grad_norm"].append(float(res.grad_norm))
        log["lr"].append(res.lr)
    log["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return log


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        setup = torch.load(Path(tmp) / "setup.pt")
        out = {}
        for kind in KINDS:
            for accum in (1, 2):
                out[kind, accum] = train(kind, setup[kind], setup["data"], workers=W,
                                         batch_size=B // accum, accum=accum, rank=rank, ddp=True)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bn_worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        setup = torch.load(Path(tmp) / "setup.pt")
        out = {bn: train("clip", setup["clip"], setup["data"], workers=W, batch_size=B, accum=1,
                         rank=rank, ddp=True, bn=bn) for bn in ("sync", "batch")}
        torch.save(out, Path(tmp) / f"bn{rank}.pt")
    finally:
        dist.destroy_process_group()


def _param_err(got: dict, want: dict, init: dict) -> float:
    """Largest parameter difference relative to the largest change training made (AdamW turns
    float noise in mathematically-zero gradients into tiny steps, so compare the whole update)."""
    err = max((got[k] - w).abs().max().item() for k, w in want.items() if w.is_floating_point())
    moved = max((w - init[k]).abs().max().item() for k, w in want.items()
                if w.is_floating_point())
    return err / moved


def test_two_workers_train_like_one_process_on_the_concatenated_batch(tmp_path):
    data = h.batches(STEPS, W * B, seed=5)
    setup: dict = {"data": data}
    ref, single_gc = {}, {}
    for kind in KINDS:
        setup[kind] = h.build(kind).state_dict()
        ref[kind] = train(kind, setup[kind], data, workers=1, batch_size=W * B, accum=1)
        single_gc[kind] = train(kind, setup[kind], data, workers=1, batch_size=B, accum=W)
    torch.save(setup, tmp_path / "setup.pt")
    mp.spawn(_worker, args=(h.free_port(), str(tmp_path)), nprocs=W, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]

    for kind in KINDS:
        want = ref[kind]
        # the schedule (warm-up 1 step, then linear decay) and clipping were exercised
        assert want["lr"] == pytest.approx([LR, LR, LR / 2], rel=1e-12)
        assert min(want["grad_norm"]) > CLIP
        assert want["loss"][-1] != want["loss"][0]
        cases = {"1 x B x 2 (GradCache)": single_gc[kind]}
        for r, res in enumerate(ranks):
            cases[f"rank {r}: 2 x B"] = res[kind, 1]
            cases[f"rank {r}: 2 x B/2 x 2 (GradCache)"] = res[kind, 2]
        for name, got in cases.items():
            assert got["lr"] == want["lr"], (kind, name)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-12), (kind, name)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-10), (kind, name)
            err = _param_err(got["state"], want["state"], setup[kind])
            print(f"{kind} {name}: parameter error / largest update {err:.1e}")
            assert err < 1e-9, (kind, name, err)


def test_sync_batchnorm_makes_two_workers_train_like_one_process_in_train_mode(tmp_path):
    data = h.batches(STEPS, W * B, seed=6)
    state = h.build("clip").state_dict()
    want = train("clip", state, data, workers=1, batch_size=W * B, accum=1, bn="batch")
    torch.save({"clip": state, "data": data}, tmp_path / "setup.pt")
    mp.spawn(_bn_worker, args=(h.free_port(), str(tmp_path)), nprocs=W, join=True)
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(W)]
    # running statistics are compared with the parameters: they moved too
    assert any("running_mean" in k and not torch.equal(v, state[k])
               for k, v in want["state"].items())
    for r, res in enumerate(ranks):
        got = res["sync"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-12), r
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-10), r
        err = _param_err(got["state"], want["state"], state)
        print(f"rank {r}: 2 x B, sync_bn: parameter error / largest update {err:.1e}")
        assert err < 1e-9, (r, err)
        # the control: per-worker batch statistics are a different model (the test can fail)
        local = _param_err(res["batch"]["state"], want["state"], state)
        print(f"rank {r}: 2 x B, per-worker BatchNorm: {local:.1e}")
        assert local > 1e-4, (r, local)
