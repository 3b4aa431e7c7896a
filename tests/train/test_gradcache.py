"""GradCache (``accum_steps`` > 1, align_ray/train/step.py) is exact: K micro-batches of B give the
parameter gradients of one batch of K x B (float64, BatchNorm frozen), for InfoNCE and SigLIP, in
one process and with 2 gloo workers under DDP; dropout draws the same masks in the no-grad pass
and the re-forward; train-mode BatchNorm updates its running stats once per micro-batch."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from align_ray.model import build_loss
from align_ray.train import step as step_lib
from align_ray.train.config import TrainConfig
from tests.train import dist_helpers as h

TOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, like a training worker (cpus_per_worker 1): tiny float64 ops with two
    OpenMP threads on a loaded 2-core box ran 200x slower (spinning threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reference(kind: str, state: dict, batch: tuple, **kw) -> tuple[float, dict]:
    """One process, one forward of the whole batch (the plain K=1 step's forward/backward)."""
    model = h.build(kind, state, **kw)
    loss = step_lib.forward_backward(model, build_loss(model.cfg, model), [h.as_dict(batch)],
                                     h.inputs)
    return loss.item(), h.grads(model)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accumulated_grads_equal_one_big_batch(kind):
    K, B = 3, 2
    (batch,) = h.batches(1, K * B)
    state = h.build(kind).state_dict()
    ref_loss, ref = _reference(kind, state, batch)
    model = h.build(kind, state)
    loss = step_lib.forward_backward(model, build_loss(model.cfg, model), h.split(batch, K),
                                     h.inputs)
    assert abs(loss.item() - ref_loss) <= 1e-12 * abs(ref_loss)
    worst = h.assert_grads_equal(h.grads(model), ref, TOL)
    print(f"{kind}: worst per-parameter grad rel err {worst:.1e}")
    # towers, projections, temperature (and the SigLIP bias) all got their gradient
    g = h.grads(model)
    assert g["log_temperature"].abs() > 0 and g["image_proj.weight"].norm() > 0
    assert g["text_tower.embeddings.word_embeddings.weight"].norm() > 0
    if kind == "siglip":
        assert g["logit_bias"].abs() > 0
    # not vacuous: plain accumulation (each micro-batch its own negatives) differs
    plain = h.build(kind, state)
    fn = build_loss(plain.cfg, plain)
    for mb in h.split(batch, K):
        (fn(*plain(*h.inputs(mb))) / K).backward()
    assert h.rel(h.grads(plain)["text_proj.weight"], ref["text_proj.weight"]) > 1e-3


@pytest.mark.parametrize("tower", ["image", "text"])
def test_locked_tower(tower):
    """With one tower locked (LiT; no graph behind its embeddings) GradCache still gives the
    big batch's gradients, and none to the locked parameters."""
    from align_ray.model.locking import lock

    K, B = 2, 3
    (batch,) = h.batches(1, K * B, seed=6)
    state = h.build("clip").state_dict()
    models = [h.build("clip", state), h.build("clip", state)]
    for m in models:
        lock(m, "ours", tower)
    ref, model = models
    build_loss(ref.cfg, ref)(*ref(*h.inputs(h.as_dict(batch)))).backward()
    step_lib.forward_backward(model, build_loss(model.cfg, model), h.split(batch, K), h.inputs)
    h.assert_grads_equal(h.grads(model), h.grads(ref), TOL)
    assert not any(n.startswith(f"{tower}_") for n in h.grads(model))


W, K2, B2 = 2, 2, 2  # the 2-worker case: 2 ranks x 2 micro-batches x 2 rows = 8 rows


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        setup = torch.load(Path(tmp) / "setup.pt")
        local = h.rows(setup["batch"], slice(rank * K2 * B2, (rank + 1) * K2 * B2))
        out = {}
        for kind in ("clip", "siglip"):
            model = h.build(kind, setup[kind])
            ddp = DDP(model)
            loss = step_lib.forward_backward(ddp, build_loss(model.cfg, ddp), h.split(local, K2),
                                             h.inputs)
            dist.all_reduce(loss)
            out[kind] = {"loss": loss.item() / W, "grads": h.grads(model)}
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_accumulated_equal_one_process(tmp_path):
    (batch,) = h.batches(1, W * K2 * B2, seed=2)
    setup, ref = {"batch": batch}, {}
    for kind in ("clip", "siglip"):
        setup[kind] = h.build(kind).state_dict()
        ref[kind] = _reference(kind, setup[kind], batch)
    torch.save(setup, tmp_path / "setup.pt")
    mp.spawn(_ddp_worker, args=(h.free_port(), str(tmp_path)), nprocs=W, join=True)
    for r in range(W):
        res = torch.load(tmp_path / f"rank{r}.pt")
        for kind, (ref_loss, ref_grads) in ref.items():
            assert abs(res[kind]["loss"] - ref_loss) <= 1e-12 * abs(ref_loss), kind
            worst = h.assert_grads_equal(res[kind]["grads"], ref_grads, TOL)
            print(f"rank {r} {kind}: worst per-parameter grad rel err {worst:.1e}")


def test_dropout_masks_match_between_passes(monkeypatch):
    """Text-tower dropout and image drop-path on: GradCache's gradients equal those of K plain
    forwards of the micro-batches in a row (the same RNG stream), so the no-grad pass and the
    re-forward drew the same masks; the RNG ends where K plain forwards leave it.  Without the
    RNG replay the gradients differ (the check is not vacuous)."""
    K, B = 2, 3
    kw = dict(dropout=0.2, drop_path=0.2)
    (batch,) = h.batches(1, K * B, seed=3)
    state = h.build("clip", **kw).state_dict()

    ref_model = h.build("clip", state, **kw)
    torch.manual_seed(123)
    outs = [ref_model(*h.inputs(mb)) for mb in h.split(batch, K)]
    rng_after = torch.get_rng_state()
    img, txt = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    build_loss(ref_model.cfg, ref_model)(img, txt, outs[0][2]).backward()
    ref = h.grads(ref_model)

    def gradcache() -> dict:
        model = h.build("clip", state, **kw)
        torch.manual_seed(123)
        step_lib.forward_backward(model, build_loss(model.cfg, model), h.split(batch, K),
                                  h.inputs)
        return h.grads(model)

    h.assert_grads_equal(gradcache(), ref, TOL)
    assert torch.equal(torch.get_rng_state(), rng_after)
    # the same again with the masks of a fresh RNG draw in the re-forward: different gradients
    torch.manual_seed(7)
    assert h.rel(h.build("clip", state, **kw)(*h.inputs(h.as_dict(batch)))[1], txt) > 1e-3

    @contextmanager
    def no_replay(self):
        yield

    monkeypatch.setattr(step_lib._RngState, "replay", no_replay)
    wrong = gradcache()
    assert h.rel(wrong["text_proj.weight"], ref["text_proj.weight"]) > 1e-3


def test_batchnorm_running_stats_updated_once_per_micro_batch():
    """Train-mode BatchNorm: after a GradCache step the running statistics equal those of K plain
    forwards (the no-grad pass's update is undone), and nothing else in the model changed."""
    K, B = 2, 3
    (batch,) = h.batches(1, K * B, seed=4)
    state = h.build("clip").state_dict()
    ref = h.build("clip", state).train()
    with torch.no_grad():
        for mb in h.split(batch, K):
            ref(*h.inputs(mb))
    model = h.build("clip", state).train()
    step_lib.forward_backward(model, build_loss(model.cfg, model), h.split(batch, K), h.inputs)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    want, got = ref.state_dict(), model.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert int(got[f"{bns[0]}.num_batches_tracked"]) == K


def test_full_step_and_config():
    """train_step (zero_grad, GradCache, clip, optimizer) runs; global batch counts accum_steps."""
    cfg = TrainConfig(data=["x"], workers=2, batch_size=4, accum_steps=3)
    assert cfg.global_batch == 24
    with pytest.raises(ValueError, match="accum_steps"):
        TrainConfig(data=["x"], accum_steps=0)
    assert step_lib.take(iter(range(5)), 2) == [0, 1]
    assert step_lib.take(iter(range(1)), 2) is None
    model = h.build("clip")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = model.text_proj.weight.detach().clone()
    (batch,) = h.batches(1, 4)
    res = step_lib.train_step(model, build_loss(model.cfg, model), h.split(batch, 2), h.inputs,
                              opt, sched, list(model.parameters()), grad_clip=0.01)
    assert res.grad_norm > 0.01 and res.lr == 1e-3 and torch.isfinite(res.loss)
    assert not torch.equal(model.text_proj.weight, before)


def test_loop_consumes_accum_steps_batches_per_step(monkeypatch, tmp_path):
    """train_loop_per_worker (with test_step_parity's Ray Train stand-ins) with accum_steps 3 on
    a stream of 3 batches of 8: one optimizer step over all 24 rows, counted as 24 samples in
    the checkpointed state and the logged metrics; then the stream has no full step left."""
    import json

    import align_ray.train.loop as loop_mod
    from align_ray.model import ModelConfig
    from tests.train import test_step_parity as tp

    batches, vocab = tp._batches()
    cfg = TrainConfig(data=["unused"], output=str(tmp_path / "run"), workers=1,
                      batch_size=tp.B, accum_steps=3, steps=10, log_every=1, checkpoint_every=1,
                      shuffle_buffer=0, model=ModelConfig.tiny(image_size=64, embed_dim=32,
                                                               vocab_size=500, max_length=32))
    reports = []
    monkeypatch.setattr(loop_mod, "_report", lambda state, *a, **k: reports.append(
        (state.step, state.samples_seen, state.global_batch)))
    seen = tp._run_align_ray(monkeypatch, cfg, batches, vocab)
    assert len(seen["losses"]) == 1  # one loss over all 3 micro-batches
    assert reports == [(1, 24, 24)]
    logged = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples_seen"]) for r in logged] == [(1, 24)]
