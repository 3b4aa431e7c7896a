"""align_ray/model/locking.py: the group partition of every kind's towers (what
``lock_*_unlocked_groups`` counts), and that a locked tower keeps its BatchNorm statistics
through training-mode forward passes."""

from __future__ import annotations

import pytest
import torch

from align_ray.model import finetune, locking
from align_ray.model.dual_encoder import DualEncoder
from align_ray.train.config import TrainConfig
from tests.model.external_models import BUILDERS, KINDS
from tests.model.helpers import tiny_cfg

# per kind: (tower, first names of [stem, first block], the head group) -- the head is exact
EXPECTED = {
    "align": ("text", ["model.text_model.embeddings.word_embeddings.weight",
                       "model.text_model.encoder.layer.0.attention.self.query.weight"],
              ["model.text_model.pooler.dense.weight", "model.text_model.pooler.dense.bias",
               "model.text_projection.weight", "model.text_projection.bias"]),
    "clip": ("image", ["model.vision_model.embeddings.class_embedding",
                       "model.vision_model.encoder.layers.0.self_attn.k_proj.weight"],
             ["model.vision_model.post_layernorm.weight", "model.vision_model.post_layernorm.bias",
              "model.visual_projection.weight"]),
    "siglip": ("image", ["model.vision_model.embeddings.patch_embedding.weight",
                         "model.vision_model.encoder.layers.0.layer_norm1.weight"], None),
    "open_clip": ("text", ["model.positional_embedding", "model.transformer.resblocks.0.ln_1.weight"],
                  ["model.text_projection", "model.ln_final.weight", "model.ln_final.bias"]),
}


@pytest.fixture(scope="module")
def library_models(tmp_path_factory) -> dict:
    out = {}
    for kind in KINDS:
        spec = BUILDERS[kind](tmp_path_factory.mktemp(f"lock-{kind}") / kind)
        cfg = TrainConfig(data=["x"], output="o", init_from=spec)
        finetune.prepare(cfg)
        out[kind] = (finetune.build_model(cfg, 0), finetune.kind_of(cfg))
    return out


@pytest.mark.parametrize("name", KINDS)
def test_groups_stem_blocks_head(library_models, name):
    model, kind = library_models[name]
    tower, (stem0, block0), head = EXPECTED[name]
    gs = locking.groups(model, kind, tower)
    assert gs[0][0] == stem0 and gs[1][0] == block0
    assert len(gs) == 4  # stem, 2 blocks (every tiny model has 2 layers), head
    if head is not None:
        assert sorted(gs[-1]) == sorted(head)
    else:  # SigLIP's attention-pooling head and final norm
        assert all(n.startswith(("model.vision_model.head.", "model.vision_model.post_layernorm."))
                   for n in gs[-1]) and any(".head.probe" in n for n in gs[-1])
    # image and text towers split every parameter but the temperature / bias
    both = locking.tower_params(model, kind, "image") + locking.tower_params(model, kind, "text")
    shared = {n for n, _ in model.named_parameters()} - set(both)
    assert shared and all(n.rsplit(".", 1)[-1] in locking.SHARED for n in shared)


def test_unlocked_groups_count_from_the_head(library_models):
    model, kind = library_models["clip"]
    gs = locking.groups(model, kind, "image")
    locked = set(locking.lock(model, kind, "image", unlocked_groups=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert locked == {n for g in gs[:-2] for n in g}
    assert set(gs[-1]) | set(gs[-2]) <= trainable and not locked & trainable
    assert set(locking.tower_params(model, kind, "text")) <= trainable


def test_locked_tower_keeps_batchnorm_stats_in_train_mode():
    torch.manual_seed(0)
    model = DualEncoder(tiny_cfg(image_size=32), 500)
    cfg = TrainConfig(data=["x"], output="o", lock_image=True, model=model.cfg)
    locking.apply_locks(model, "ours", cfg)
    before = {k: v.clone() for k, v in model.image_tower.state_dict().items()}
    text_before = model.text_tower.embeddings.LayerNorm.weight.clone()
    model.train()
    ids = torch.randint(5, 500, (4, 8))
    img, txt, temp = model(torch.randn(4, 3, 32, 32) * 3, ids, torch.ones_like(ids))
    (img.sum() + (txt @ img.T).sum() / temp).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    after = model.image_tower.state_dict()
    assert any("running_mean" in k for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)   # weights AND BN statistics
    assert not model.image_tower.training and model.text_tower.training
    assert not torch.equal(text_before, model.text_tower.embeddings.LayerNorm.weight)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats_keeps_the_loaded_statistics_and_trains_the_rest(freeze):
    """``freeze_bn_stats``: the image tower trains (its BatchNorm scale and shift included) while
    every BatchNorm layer normalises with, and keeps, its loaded running statistics; without it
    a training-mode step moves them (the control)."""
    torch.manual_seed(0)
    model = DualEncoder(tiny_cfg(image_size=32), 500)
    cfg = TrainConfig(data=["x"], output="o", freeze_bn_stats=freeze, model=model.cfg)
    bns = {n: m for n, m in model.image_tower.named_modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    counts = locking.apply_locks(model, "ours", cfg)
    assert bns and counts["bn_frozen"] == (len(bns) if freeze else 0) and counts["locked"] == 0
    stats = {k: v.clone() for k, v in model.image_tower.state_dict().items() if "running" in k}
    params = {k: v.detach().clone() for k, v in model.image_tower.named_parameters()}
    model.train()
    ids = torch.randint(5, 500, (4, 8))
    img, txt, temp = model(torch.randn(4, 3, 32, 32) * 3, ids, torch.ones_like(ids))
    (img.sum() + (txt @ img.T).sum() / temp).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    after = model.image_tower.state_dict()
    kept = [torch.equal(stats[k], after[k]) for k in stats]
    assert all(kept) if freeze else not any(kept)
    assert all(m.training != freeze for m in bns.values()) and model.image_tower.training
    moved = {k for k, p in model.image_tower.named_parameters() if not torch.equal(params[k], p)}
    assert {f"{n}.weight" for n in bns} <= moved and len(moved) == len(params)
