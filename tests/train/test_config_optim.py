"""TrainConfig loading (nested ModelConfig presets), the lr schedule, weight-decay groups and the
SyncBatchNorm option (no Ray).  The data position on resume: test_order.py."""

from __future__ import annotations

import pytest
import torch

from align_ray.config import load
from align_ray.model import DualEncoder, ModelConfig
from align_ray.train.config import TrainConfig
from align_ray.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_defaults_learn_and_yaml_presets(tmp_path):
    cfg = TrainConfig()
    assert cfg.model.temperature_init == 0.07 and cfg.model.image_size == 64  # short-run default
    # a plain loop's short-run recipe (issue 13): AdamW 1e-3, short warm-up, no clip, no crop
    assert (cfg.optimizer, cfg.lr, cfg.warmup_steps, cfg.grad_clip, cfg.crop_scale, cfg.hflip) == \
        ("adamw", 1e-3, 30, 0.0, (1.0, 1.0), 0.5)
    y = tmp_path / "t.yaml"
    y.write_text("steps: '7'\nloss: siglip\nmodel: {preset: align, image_size: 96}\n")
    cfg = load(TrainConfig, str(y), data=["a.parquet"], batch_size=None)
    assert (cfg.steps, cfg.batch_size, cfg.data) == (7, 64, ["a.parquet"])
    assert cfg.model.temperature_init == 1.0 and cfg.model.image_size == 96  # ALIGN-faithful
    assert cfg.model.loss == "siglip" and cfg.global_batch == 128
    y.write_text("model: {embed_dim: 32}\n")  # no preset: ModelConfig's own defaults
    assert load(TrainConfig, str(y)).model.image_size == ModelConfig().image_size


@pytest.mark.parametrize("text,err", [("optimizer: sgd\n", "optimizer"), ("lossy: 1\n", "lossy"),
                                      ("model: {preset: huge}\n", "preset"),
                                      ("model: {imagesize: 1}\n", "imagesize"),
                                      ("hflip: 1.5\n", "hflip"),
                                      ("color_jitter: -0.1\n", "color_jitter"),
                                      ("grayscale: 2\n", "grayscale"),
                                      ("lr: -1\n", "lr must be a positive number"),
                                      ("lr: 0\n", "lr must be a positive number"),
                                      ("lr: .nan\n", "lr must be a positive number"),
                                      ("weight_decay: -0.1\n", "weight_decay"),
                                      ("grad_clip: -1\n", "grad_clip"),
                                      ("min_lr_ratio: 2\n", "min_lr_ratio"),
                                      ("model: {preset: tiny, embed_dim: 0}\n",
                                       "model.embed_dim must be positive"),
                                      ("model: {image_size: -64}\n", "model.image_size"),
                                      ("model: {drop_path_rate: 1}\n", "drop_path_rate")])
def test_bad_values_are_errors(tmp_path, text, err):
    y = tmp_path / "t.yaml"
    y.write_text(text)
    with pytest.raises(ValueError, match=err):
        load(TrainConfig, str(y))


def test_elastic_keeps_the_global_batch_and_checks_it_divides(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("workers: 4\nmin_workers: 2\nbatch_size: 6\naccum_steps: 2\n"
                 "worker_resources: {gpu_train: 1}\n")
    cfg = load(TrainConfig, str(y))
    assert cfg.global_batch == 48 and cfg.worker_resources == {"gpu_train": 1}
    assert [cfg.rank_batch(w) for w in (4, 3, 2)] == [6, 8, 12]   # x w x 2 = 48 at every size
    assert TrainConfig(workers=4, batch_size=6).rank_batch(2) == 6  # not elastic: unchanged
    for text, err in (("workers: 3\nmin_workers: 2\nbatch_size: 5\n", r"\[2\] workers cannot share"),
                      ("workers: 2\nmin_workers: 2\n", "min_workers must be between"),
                      ("worker_resources: {gpu: -1}\n", "worker_resources")):
        y.write_text(text)
        with pytest.raises(ValueError, match=err):
            load(TrainConfig, str(y))


def test_linear_and_cosine_schedules():
    kw = dict(total=10, warmup=2)
    assert [lr_factor(s, schedule="linear", **kw) for s in (0, 1, 2, 6, 10)] == \
        pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    assert lr_factor(6, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(10, schedule="cosine", min_ratio=0.1, **kw) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_temperature():
    model = DualEncoder(ModelConfig.tiny(embed_dim=16, loss="siglip"), vocab_size=50)
    decay, skip = param_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in skip["params"]}
    assert "log_temperature" in skipped and "logit_bias" in skipped
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert not any("norm" in names[id(p)].lower() or p.ndim < 2 for p in decay["params"])
    opt = build_optimizer(model, TrainConfig(optimizer="lamb", model=ModelConfig.tiny()))
    assert type(opt).__name__ == "Lamb" and opt.param_groups[1]["weight_decay"] == 0.0


def test_layer_decay_scales_each_towers_groups_from_the_head_down():
    """``layer_decay: d``: a parameter d groups below its tower's head trains at lr x d**d, through
    warm-up and decay; at 1 the optimizer has the two groups it always had (old checkpoints
    resume)."""
    from align_ray.model import locking

    model = DualEncoder(ModelConfig.tiny(embed_dim=16, vocab_size=100), 100)
    assert len(build_optimizer(model, TrainConfig(model=ModelConfig.tiny())).param_groups) == 2
    cfg = TrainConfig(model=ModelConfig.tiny(), layer_decay=0.5, lr=0.1, warmup_steps=2, steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for tower in ("image", "text"):
        gs = locking.groups(model, "ours", tower)
        assert len(gs) >= 3       # stem, blocks, head: the decay has something to do
        for depth, group in enumerate(reversed(gs)):
            lrs = sorted({group_of[id(names[n])]["initial_lr"] for n in group})
            assert lrs == pytest.approx([0.1 * 0.5 ** depth])
    assert group_of[id(names["log_temperature"])]["initial_lr"] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)
    base = [g["initial_lr"] for g in opt.param_groups]
    for _ in range(4):            # past warm-up, into the decay: every group keeps its ratio
        opt.step()
        sched.step()
    factor = lr_factor(4, total=10, warmup=2, schedule="linear")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            TrainConfig(layer_decay=bad)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_batchnorm_option(device):
    from align_ray.train import syncbn
    from align_ray.train.loop import maybe_sync_bn, wants_sync_bn

    model = DualEncoder(ModelConfig.tiny(embed_dim=16, vocab_size=100), 100)
    auto = TrainConfig(use_gpu=device == "cuda")
    # auto: >1 worker, BatchNorm and a GPU; on CPU opt-in (a gloo round trip per layer)
    assert wants_sync_bn(model, auto, world=2) == (device == "cuda")
    assert wants_sync_bn(model, TrainConfig(sync_bn=True), world=2)
    assert not wants_sync_bn(model, auto, world=1)
    assert not wants_sync_bn(model, TrainConfig(sync_bn=False), world=2)
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    acts = [type(m.act) for m in model.modules() if hasattr(m, "act") and
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    synced = maybe_sync_bn(model, TrainConfig(sync_bn=True), world=2, device=torch.device(device))
    # CPU: our gloo-capable layer (torch's refuses CPU tensors); GPU: torch's own
    kind = syncbn.SyncBatchNorm if device == "cpu" else torch.nn.SyncBatchNorm
    sync = [m for m in synced.modules() if isinstance(m, kind)]
    assert len(sync) == n_bn > 0
    # timm's fused BatchNorm+activation layers keep their activation
    assert [type(m.act) for m in sync if hasattr(m, "act")] == acts and acts
    assert set(synced.state_dict()) == set(DualEncoder(model.cfg, 100).state_dict())
    if device == "cpu":   # outside a process group it is plain BatchNorm, same outputs
        ref = DualEncoder(model.cfg, 100)
        ref.load_state_dict(synced.state_dict())
        x = torch.randn(4, 3, 64, 64)
        assert torch.allclose(synced.encode_image(x), ref.encode_image(x), atol=1e-6)
