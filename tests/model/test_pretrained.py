"""save_pretrained / load_pretrained round trips and the Embedder on real and garbage bytes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from align_ray.model import DualEncoder, Embedder, load_pretrained, save_pretrained, tokenize
from align_ray.model.dual_encoder import check_towers
from tests.model.helpers import tiny_cfg


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = DualEncoder(cfg, len(tokenizer))
    out = tmp_path_factory.mktemp("model")
    save_pretrained(model, tokenizer, cfg, out)
    return model.eval(), out


def test_saved_dir_layout(saved, tokenizer):
    _, out = saved
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["vocab_size"] == len(tokenizer)
    assert meta["model_config"]["image_model"] == "test_efficientnet"
    assert meta["model_config"]["image_mean"] == [0.485, 0.456, 0.406]
    assert meta["text_tower_config"]["model_type"] == "bert"


def test_round_trip_identical_embeddings(saved, tokenizer, dev_rows, monkeypatch):
    model, out = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, tok, cfg = load_pretrained(out)
    assert not loaded.training and cfg.embed_dim == 128 and len(tok) == len(tokenizer)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    emb = Embedder.load(out)
    texts = dev_rows["text"][:8]
    enc = tokenize(tokenizer, texts, 64)
    with torch.no_grad():
        direct = model.encode_text(enc["input_ids"], enc["attention_mask"]).numpy()
    got = emb.embed_texts(texts)
    assert got.dtype == np.float32 and np.array_equal(got, direct)
    fresh = Embedder(model, tokenizer, model.cfg)
    assert np.array_equal(fresh.embed_images(dev_rows["image"][:8]), emb.embed_images(dev_rows["image"][:8]))


def test_embedder_real_pngs_batching_and_bad_bytes(saved, dev_rows):
    _, out = saved
    emb = Embedder.load(out, batch_size=3)
    assert emb.dim == 128 and emb.image_size == 64 and emb.cfg.image_size == 64
    imgs = dev_rows["image"][:7]
    a = emb.embed_images(imgs)
    assert a.shape == (7, 128) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.allclose(a, emb.embed_images(imgs, batch_size=64), atol=1e-5)  # batching-invariant
    t = emb.embed_texts(dev_rows["text"][:7])
    assert t.shape == (7, 128) and np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert emb.embed_texts([]).shape == (0, 128) and emb.embed_images([]).shape == (0, 128)
    with pytest.raises(ValueError, match="index 4"):
        emb.embed_images(imgs[:4] + [b"\x00garbage bytes"] + imgs[:2])


def test_saved_dir_is_self_contained(tmp_path, tokenizer, monkeypatch):
    """Pretrained sources (a text_model dir standing in for a hub name, a timm checkpoint file)
    are not needed at load time: the towers are rebuilt from the saved config."""
    bert_dir = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    ckpt = tmp_path / "img.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), ckpt)
    cfg = tiny_cfg(text_model=str(bert_dir), image_pretrained=str(ckpt))
    check_towers(cfg)   # what `align-ray train` checks before Ray: these sources load
    model = DualEncoder(cfg, len(tokenizer)).eval()
    save_pretrained(model, tokenizer, cfg, tmp_path / "saved")
    shutil.rmtree(bert_dir)
    ckpt.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = Embedder.load(tmp_path / "saved")
    assert emb.model.text_tower.config.hidden_size == 32
    sd, sd2 = model.state_dict(), emb.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_siglip_bias_saved(tmp_path, tokenizer):
    cfg = tiny_cfg(loss="siglip")
    model = DualEncoder(cfg, len(tokenizer))
    with torch.no_grad():
        model.logit_bias.fill_(-4.25)
    save_pretrained(model, tokenizer, cfg, tmp_path)
    loaded, _, cfg2 = load_pretrained(tmp_path)
    assert cfg2.loss == "siglip" and loaded.logit_bias.item() == -4.25


def test_s3_round_trip(s3, saved, dev_rows):
    model, _ = saved
    s3.create_bucket(Bucket="models")
    emb = Embedder(model, Embedder.load(saved[1]).tokenizer, model.cfg)
    save_pretrained(model, emb.tokenizer, model.cfg, "s3://models/run1/model")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="models")["Contents"]}
    assert "run1/model/model.safetensors" in keys and "run1/model/config.json" in keys
    remote = Embedder.load("s3://models/run1/model")
    assert np.array_equal(remote.embed_images(dev_rows["image"][:3]), emb.embed_images(dev_rows["image"][:3]))
