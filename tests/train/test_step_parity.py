"""align-ray's training step equals a plain PyTorch step (issue 13).

``train_loop_per_worker`` runs for real on one rank with the Ray Train API replaced by stand-ins
(context, device, ``prepare_model``, a data stream that yields fixed batches once, report/checkpoint
as no-ops).  A plain loop then starts from the same initial weights and dropout stream and trains on
the same batches with ``torch.optim.AdamW`` over all parameters, the same warm-up + linear decay
and a hand-written label-smoothed symmetric InfoNCE.  Losses and parameters must agree: any extra
transform, mis-scaled normalisation, optimizer group or schedule quirk in the loop shows up here.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import align_ray.train.loop as loop_mod
from align_ray.train.order import DataOrder
from align_ray.model import DualEncoder, ModelConfig
from align_ray.model.tokenizer import train_wordpiece
from align_ray.model.transforms import decode_rgb, image_norm
from align_ray.train.config import TrainConfig
from align_ray.train.optim import lr_factor

from .conftest import DEV

B, STEPS, TOTAL, WARMUP, LR = 8, 3, 100, 10, 1e-3


def _batches() -> tuple[list[dict], int]:
    t = pq.read_table(DEV, columns=["image", "alt_text"]).slice(0, 64).to_pydict()
    tok = train_wordpiece(t["alt_text"], 500, 32)
    pixels = np.stack([np.asarray(decode_rgb(b)).transpose(2, 0, 1) for b in t["image"]])
    enc = tok(t["alt_text"], padding="max_length", max_length=32, truncation=True,
              return_tensors="pt", return_token_type_ids=False)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        idx = torch.randperm(64, generator=g)[:B]
        out.append({"pixels": torch.from_numpy(pixels)[idx], "input_ids": enc["input_ids"][idx],
                    "attention_mask": enc["attention_mask"][idx], "row_id": idx.long()})
    return out, len(tok)


def _run_align_ray(monkeypatch, cfg: TrainConfig, batches: list[dict], vocab: int):
    import ray.train
    import ray.train.torch

    seen: dict = {"losses": []}

    class Ctx:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    class Stream:  # ingest.RankStream's interface
        calls, epoch, position = 0, 0, (0, 0)
        order = DataOrder([64], seed=0, world=1, window_rows=0)  # one input file

        def batches(self, n_batches):
            Stream.calls += 1  # one pass; the next is empty, so the loop stops there
            return iter([dict(b) for b in batches] if Stream.calls == 1 else [])

    def prepare(model):
        seen["model"], seen["init"] = model, copy.deepcopy(model.state_dict())
        return model

    real_build_loss = loop_mod.build_loss

    def build_loss(*a, **k):
        fn = real_build_loss(*a, **k)

        def logged(img, txt, temp):
            loss = fn(img, txt, temp)
            seen["losses"].append(float(loss.detach()))
            return loss
        return logged

    monkeypatch.setattr(loop_mod, "build_loss", build_loss)
    monkeypatch.setattr(ray.train, "get_context", lambda: Ctx())
    monkeypatch.setattr(loop_mod, "rank_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda *a, **k: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", prepare)
    with pytest.raises(RuntimeError, match="no full global batch"):
        loop_mod.train_loop_per_worker({"cfg": cfg, "vocab_size": vocab})
    return seen


def _plain(cfg: TrainConfig, init: dict, batches: list[dict], vocab: int):
    model = DualEncoder(cfg.model, vocab)
    model.load_state_dict(init)
    model.train()
    torch.manual_seed(cfg.seed * 1000)  # the loop's rank-0 dropout stream
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total=TOTAL, warmup=WARMUP, schedule="linear"))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_norm(cfg.model))
    losses = []
    for b in batches:
        x = (b["pixels"].float() / 255.0 - mean) / std
        img, txt, temp = model(x, b["input_ids"], b["attention_mask"])
        logits = img @ txt.T / temp
        labels = torch.arange(len(img))
        loss = 0.5 * (F.cross_entropy(logits, labels, label_smoothing=0.1)
                      + F.cross_entropy(logits.T, labels, label_smoothing=0.1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return model, losses


def test_train_step_matches_plain_pytorch(monkeypatch, tmp_path):
    batches, vocab = _batches()
    # weight decay off: the loop's no-decay groups are tested in test_config_optim
    cfg = TrainConfig(data=["unused"], output=str(tmp_path / "run"), workers=1, batch_size=B,
                      steps=TOTAL, lr=LR, warmup_steps=WARMUP, grad_clip=0.0, weight_decay=0.0,
                      log_every=1, checkpoint_every=1000, shuffle_buffer=0,
                      model=ModelConfig.tiny(image_size=64, embed_dim=32, vocab_size=500,
                                             max_length=32))
    threads = torch.get_num_threads()
    try:  # the loop runs on cpus_per_worker (1) threads: the same reduction order in both runs
        seen = _run_align_ray(monkeypatch, cfg, batches, vocab)
        torch.set_num_threads(1)
        plain, plain_losses = _plain(cfg, seen["init"], batches, vocab)
    finally:
        torch.set_num_threads(threads)
    # the first loss sees identical weights and inputs: any transform or loss difference shows
    # here. After an Adam step, float reduction order alone moves the loss by a few 1e-4 (the
    # plain loop against itself on 1 and 2 threads), more for some vocabularies than others.
    np.testing.assert_allclose(seen["losses"][0], plain_losses[0], rtol=1e-5)
    np.testing.assert_allclose(seen["losses"], plain_losses, rtol=1e-3)
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(logged) == STEPS and all(r["grad_norm"] > 0 for r in logged)  # measured, not clipped
    assert plain_losses[-1] != plain_losses[0]  # it trained
    got, want, init = seen["model"].state_dict(), plain.state_dict(), seen["init"]
    num = den = 0.0
    for k, w in want.items():
        if w.dtype.is_floating_point:
            num += float((got[k] - w).pow(2).sum())
            den += float((w - init[k]).pow(2).sum())
    # Adam turns float noise in near-zero gradients into +-lr steps: compare the whole update.
    assert (num / den) ** 0.5 < 5e-3
