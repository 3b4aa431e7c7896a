"""``align-ray train --init-from``: each kind (our own dir, HF ALIGN / CLIP / SigLIP / SigLIP 2,
open_clip)
fine-tuned for a few steps on 2 Ray Train workers through the real ingest, loop and loss.

The data set is 8 pairs = one global batch (2 workers x 4), no flip, no random crop: every step
trains on exactly the batch the loss is measured on, so "lower at the end than at the start on
the same batch" is a test that fails when nothing (or the wrong thing) learns.  The loss is
measured outside training, on the embeddings of the saved model as its own library preprocesses
them, with the model's own temperature (and SigLIP bias)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from align_ray.cli import main
from align_ray.model import build_loss, finetune
from align_ray.model.external import resolve_spec
from align_ray.model.pretrained import load_embedder
from align_ray.train.config import TrainConfig
from align_ray.train.run import run
from tests.model.external_models import BUILDERS, OPEN_CLIP_CFG, assert_embeds_like, captions, png

N = 8
# kind -> the towers locked (LiT image locking; text locking; unlocking the head of CLIP's image)
LOCKS = {
    "ours": dict(lock_image=True),           # timm EfficientNet + BatchNorm
    "align": dict(lock_image=True),          # HF EfficientNet + BatchNorm: statistics stay too
    "clip": dict(lock_image=True, lock_image_unlocked_groups=1),
    "siglip": dict(lock_text=True),
    "siglip2": dict(lock_text=True),         # the image tower trains: its NaFlex patch path
    "open_clip": dict(lock_image=True),
}
# the library's own state_dict prefixes of each tower
IMAGE = {"ours": ("image_tower.", "image_proj."), "hf": ("vision_model.", "visual_projection."),
         "open_clip": ("visual.",)}
SHARED = ("log_temperature", "temperature", "logit_scale", "logit_bias")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    rows = {"image": [png(200 + i) for i in range(N)], "text": captions(N + 3)[3:]}
    path = tmp_path_factory.mktemp("ft-data") / "pairs.parquet"
    pq.write_table(pa.table(rows), path)
    return {**rows, "path": str(path)}


def _standardise(proj: torch.nn.Linear, feats: torch.Tensor) -> None:
    proj.weight.div_(feats.std(0).clamp_min(1e-6))
    proj.bias.copy_(-(proj.weight @ feats.mean(0)))


def _ours(out: Path, pairs: dict) -> str:
    """A tiny DualEncoder of ours, saved.  A random tower gives every input almost the same
    embedding (the loss sits at ln 8 and nothing learns in 4 steps), so both projections are
    standardised on the pairs first, as tests/model/external_models.py does for ALIGN's text."""
    from align_ray.model import DualEncoder, Embedder, save_pretrained, tokenize, train_wordpiece
    from tests.model.helpers import tiny_cfg

    tok = train_wordpiece(pairs["text"] * 4, vocab_size=200, max_length=16)
    cfg = tiny_cfg(image_size=32, embed_dim=32, max_length=16)
    torch.manual_seed(0)
    model = DualEncoder(cfg, len(tok), init_pretrained=False).eval()
    with torch.no_grad():
        px = torch.from_numpy(Embedder(model, tok, model.cfg).preprocess(pairs["image"]))
        _standardise(model.image_proj, model.image_tower(px))
        enc = tokenize(tok, pairs["text"], 16)
        _standardise(model.text_proj, model.text_tower(**enc).last_hidden_state[:, 0])
    save_pretrained(model, tok, model.cfg, out)
    return str(out)


def _state(kind: str, spec: str) -> dict[str, torch.Tensor]:
    """The model's weights as its own library loads them (the saved model must load there)."""
    if kind == "ours":
        from align_ray.model.pretrained import load_pretrained

        return load_pretrained(spec)[0].state_dict()
    if kind == "open_clip":
        import open_clip

        spec = resolve_spec(spec)
        if spec.startswith("open_clip:local-dir:"):  # our saved folder: a plain state_dict file
            arch, ckpt = "tiny-clip-test", spec.split(":", 2)[2] + "/" + finetune.OPEN_CLIP_WEIGHTS
        else:
            _, cfg, ckpt = spec.split(":")
            open_clip.add_model_config(cfg)
            arch = Path(cfg).stem
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=ckpt)
        return model.state_dict()
    import transformers

    mtype = json.loads((Path(spec) / "config.json").read_text())["model_type"]
    cls = getattr(transformers, {"align": "AlignModel", "clip": "CLIPModel",
                                 "siglip": "SiglipModel", "siglip2": "Siglip2Model"}[mtype])
    model, info = cls.from_pretrained(spec, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return model.state_dict()


def _loss(spec: str, pairs: dict, siglip: bool) -> float:
    """The training loss (label smoothing 0.1 / sigmoid) on the 8 pairs, from the library's own
    preprocessing and features and the model's own temperature (and bias)."""
    emb = load_embedder(spec)
    img = torch.from_numpy(emb.embed_images(pairs["image"]))
    txt = torch.from_numpy(emb.embed_texts(pairs["text"]))
    inner = getattr(emb.model, "model", emb.model)
    model_cfg = TrainConfig(data=["x"], output="o", loss="siglip" if siglip else "infonce").model
    loss = build_loss(model_cfg, inner if siglip else None)
    with torch.no_grad():
        return float(loss(img, txt, emb.model.temperature.detach().float()))


T0 = 0.2   # the sources' temperature: far from every library's default (0.07, SigLIP's 0.1)
B0 = -3.0  # the SigLIP sources' logit bias: far from SigLIP's published init and ours (-10)


def _set_temperature(src: str) -> None:
    """Rewrite the saved source's temperature parameter to ``T0`` (in the library's own terms:
    our log temperature, ALIGN's temperature, the others' logit scale = log(1 / T)), and a
    SigLIP's logit bias to ``B0``."""
    import math

    from safetensors.torch import load_file, save_file

    if src.startswith("open_clip:"):
        ckpt = src.rsplit(":", 1)[1]
        state = torch.load(ckpt)
        state["logit_scale"] = torch.full_like(state["logit_scale"], math.log(1 / T0))
        torch.save(state, ckpt)
        return
    path = Path(src) / "model.safetensors"
    state = load_file(path)
    key, value = next((k, v) for k, v in (("log_temperature", math.log(T0)),
                                          ("temperature", T0),
                                          ("logit_scale", math.log(1 / T0))) if k in state)
    state[key] = torch.full_like(state[key], value)
    if "logit_bias" in state:
        state["logit_bias"] = torch.full_like(state["logit_bias"], B0)
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture
def hub_snapshot():
    """Where huggingface_hub keeps a downloaded snapshot of ``NAME``: yields (name, its
    snapshot dir); the cache entry is removed afterwards.  The hub is unreachable here (and the
    tests run with HF_HUB_OFFLINE=1), so a model placed there is what a download would leave."""
    import uuid

    from huggingface_hub import constants

    name = f"align-ray-test/tiny-align-{uuid.uuid4().hex[:8]}"
    repo = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
    rev = "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    try:
        yield name, repo / "snapshots" / rev
    finally:
        shutil.rmtree(repo, ignore_errors=True)


@pytest.mark.parametrize("name", list(LOCKS))
def test_finetune_each_kind(name, ray_cluster, pairs, tmp_path, hub_snapshot):
    src = (_ours(tmp_path / "src", pairs) if name == "ours"
           else BUILDERS[name](hub_snapshot[1] if name == "align" else tmp_path / "src"))
    _set_temperature(src)
    # ALIGN is fine-tuned from a hub name (``--init-from ORG/NAME``), read through the hub cache
    # by the driver and by every Ray Train worker; the others from a local dir
    init_from = hub_snapshot[0] if name == "align" else src
    assert float(load_embedder(src).model.temperature.detach()) == pytest.approx(T0, rel=1e-5)
    def config(steps: int) -> TrainConfig:
        return TrainConfig(data=[pairs["path"]], image_col="image", text_col="text",
                           output=str(tmp_path / "run"), workers=2, batch_size=4, steps=steps,
                           lr=2e-3, warmup_steps=0, schedule="constant", log_every=1,
                           checkpoint_every=2, data_workers=1, data_batch_size=8,
                           shuffle_buffer=0, hflip=0.0, init_from=init_from, **LOCKS[name])

    cfg = config(4)
    kind = finetune.kind_of(cfg)
    s = run(cfg)
    assert s["step"] == 4 and s["samples_seen"] == 4 * N
    # training starts from the source's temperature (one optimizer step moves it a little)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["temperature"] == pytest.approx(T0, rel=0.03), first
    if name == "clip":
        # a fine-tune resumes like any run: same output, more steps -> on from the step-4
        # checkpoint of the library model (locks, temperature and optimizer state with it)
        s = run(config(6))
        assert (s["step"], s["samples_seen"], s["resumed_from_step"]) == (6, 6 * N, 4)
    out = s["model_dir"]

    before, after = _state(kind, src), _state(kind, out)   # loads back in its own library
    assert set(before) == set(after)
    image = [k for k in before if k.startswith(IMAGE[kind])]
    text = [k for k in before if k not in image and k.rsplit(".", 1)[-1] not in SHARED]
    assert image and text
    locked, free = (image, text) if cfg.lock_image else (text, image)
    if cfg.lock_image_unlocked_groups:  # CLIP's image head (final norm + projection) trains
        head = [k for k in image if k.startswith(("vision_model.post_layernorm.", "visual_projection."))]
        assert head and not all(torch.equal(before[k], after[k]) for k in head)
        locked = [k for k in image if k not in head]
    changed = [k for k in locked if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]                         # bit-identical, BN statistics too
    assert not all(torch.equal(before[k], after[k]) for k in free)

    siglip = name in ("siglip", "siglip2")
    if siglip:  # the loss trains the source's own bias: not a fresh one of its own (-10)
        b0, b1 = float(before["logit_bias"]), float(after["logit_bias"])
        assert b0 == pytest.approx(B0) and b1 != b0 and abs(b1 - b0) < 0.1, (b0, b1)
    assert cfg.loss == ("siglip" if siglip else "infonce")
    start, end = _loss(src, pairs, siglip), _loss(out, pairs, siglip)
    assert end < start, (start, end)
    if kind == "open_clip":  # the saved folder is a --model spec of its own
        assert resolve_spec(out) == f"open_clip:local-dir:{out}"


def test_malformed_init_from_exits_2(pairs, tmp_path, capsys):
    base = ["train", "--data", pairs["path"], "--output", str(tmp_path / "o")]

    def exit_2(args: list[str], *expect: str) -> None:
        assert main(base + args) == 2
        err = capsys.readouterr().err
        for e in expect:
            assert e in err, err

    exit_2(["--init-from", str(tmp_path / "nothing")], "init_from", "not a saved model",
           "open_clip:ARCH[:CHECKPOINT]")
    exit_2(["--init-from", "no-such-org/no-such-model"], "as a Hugging Face hub name")
    clip = Path(BUILDERS["clip"](tmp_path / "clip"))
    cfg = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({**cfg, "model_type": "blip"}))
    exit_2(["--init-from", str(clip)], "unknown model_type 'blip'", "'siglip'")
    (clip / "config.json").write_text(json.dumps(cfg))
    no_weights = shutil.copytree(clip, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    exit_2(["--init-from", str(no_weights)], "no weights file", "model.safetensors")
    BUILDERS["siglip"](tmp_path / "siglip")
    shutil.copy(tmp_path / "siglip" / "model.safetensors", clip / "model.safetensors")
    exit_2(["--init-from", str(clip)], "CLIPModel")          # weights of another architecture
    exit_2(["--init-from", "open_clip:no-such-arch"], "unknown open_clip architecture")
    wider = tmp_path / "tiny-clip-wide.json"
    wider.write_text(json.dumps({**OPEN_CLIP_CFG, "embed_dim": 48}))
    spec = BUILDERS["open_clip"](tmp_path / "oc")
    exit_2(["--init-from", f"open_clip:{wider}:{spec.rsplit(':', 1)[1]}"],
           "checkpoint does not fit open_clip architecture tiny-clip-wide")
    exit_2(["--init-from", f"{spec.rsplit(':', 1)[0]}:{tmp_path / 'missing.pt'}"],
           "missing.pt does not exist")
    exit_2(["--lock-image-unlocked-groups", "2"], "needs lock_image")


@pytest.mark.parametrize("name", ["align", "clip", "siglip", "siglip2", "open_clip"])
def test_training_pixels_are_what_the_librarys_processor_makes(name, tmp_path):
    """A fine-tune keeps the model's preprocessing: the ingest's square crops at the training
    side, normalised with the mean and std ``finetune.prepare`` found for the model, give the
    trainable model the image embedding the library's own processor (or open_clip's transform)
    + feature function gives.  SigLIP 2's crops are cut into NaFlex patches by
    ``NaFlexPacking.from_square``."""
    import numpy as np
    from PIL import Image

    from align_ray.model.external import load_external

    spec = BUILDERS[name](tmp_path / name)
    cfg = TrainConfig(data=["x"], output=str(tmp_path / "o"), init_from=spec)
    finetune.prepare(cfg)
    S = cfg.model.image_size
    if name == "siglip2":
        assert S == 8 * 4                              # 8 px patches, at most 16: a 4 x 4 grid
    model = finetune.build_model(cfg, 0).eval()
    lib = load_external(spec)
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in range(4)]
    mean = torch.tensor(cfg.model.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.image_std).view(1, 3, 1, 1)
    px = (torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() - 255 * mean) / (255 * std)
    with torch.no_grad():
        ours = torch.nn.functional.normalize(model.encode_image(px), dim=-1)
        theirs = lib.model.encode_image(torch.stack([lib.image_transform(Image.fromarray(a))
                                                     for a in arrs]))
        theirs = torch.nn.functional.normalize(theirs, dim=-1)
    assert_embeds_like(ours.numpy(), theirs.numpy(), name)
