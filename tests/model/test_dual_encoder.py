"""Towers at 64 px: shapes, unit norm, pretrained text dir, local timm checkpoint file."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from transformers import BertConfig, BertModel

from align_ray.model import (DualEncoder, build_tokenizer, load_pretrained, locking, save_pretrained,
                             train_wordpiece)
from align_ray.model.dual_encoder import check_towers, unwrap
from tests.model.helpers import tiny_cfg


def _inputs(b: int = 3, vocab: int = 100):
    ids = torch.randint(5, vocab, (b, 12))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return torch.randn(b, 3, 64, 64), ids, mask


def test_forward_shapes_unit_norm_temperature():
    model = DualEncoder(tiny_cfg(), 100)
    img, txt, t = model(*_inputs())
    assert img.shape == txt.shape == (3, 128)
    assert img.dtype == txt.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert abs(t.item() - 0.07) < 1e-6 and t.requires_grad
    assert model.text_tower.pooler is None  # DDP: no unused parameters
    assert not hasattr(model, "logit_bias")
    assert model.cfg.image_mean == (0.485, 0.456, 0.406)
    (img.sum() + txt.sum() + t).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_siglip_model_owns_bias_and_align_style_projection():
    model = DualEncoder(tiny_cfg(loss="siglip", siglip_bias_init=-10.0), 50)
    assert model.logit_bias.item() == -10.0
    width = timm.create_model("test_efficientnet", num_classes=0).num_features
    exact = DualEncoder(tiny_cfg(project_image=False, embed_dim=width), 50)
    assert isinstance(exact.image_proj, torch.nn.Identity)
    img, txt, _ = exact(*_inputs(2, 50))
    assert img.shape == txt.shape == (2, width)
    nwd = model.no_weight_decay_names()
    assert {"log_temperature", "logit_bias", "text_proj.bias"} <= nwd
    assert "text_proj.weight" not in nwd and "image_proj.weight" not in nwd


def test_text_tower_from_local_pretrained_dir(tmp_path):
    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    tok = train_wordpiece(["a red car", "a blue boat on the sea"] * 20, vocab_size=300)
    tok.save_pretrained(tmp_path / "bert")
    cfg = tiny_cfg(text_model=str(tmp_path / "bert"))
    tok2 = build_tokenizer(cfg)  # a pretrained text tower brings its own vocabulary
    assert tok2("a red car")["input_ids"] == tok("a red car")["input_ids"]
    model = DualEncoder(cfg, 300)
    assert model.text_tower.pooler is None
    ref = bert.state_dict()
    for k, v in model.text_tower.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert model.text_proj.in_features == 64


def test_text_tower_in_its_own_space(tmp_path):
    """``project_text=False``: the text embedding is the encoder's own normalised mean-pooled
    state (a sentence encoder's output), and locking the text tower whole freezes all of it."""
    torch.manual_seed(5)
    bert = BertModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    cfg = tiny_cfg(text_model=str(tmp_path / "bert"), text_pooling="mean", embed_dim=64, project_text=False)
    model = DualEncoder(cfg, 300).eval()
    assert isinstance(model.text_proj, torch.nn.Identity)
    pixels, ids, mask = _inputs(3, 300)
    with torch.no_grad():
        h = bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        img, txt, _ = model(pixels, ids, mask)
    assert img.shape == (3, 64)
    assert torch.allclose(txt, want, atol=1e-6)
    tok = train_wordpiece(["a red car", "a blue boat on the sea"] * 20, vocab_size=300)
    save_pretrained(model, tok, model.cfg, tmp_path / "saved")   # config.json says project_text
    back, _, back_cfg = load_pretrained(tmp_path / "saved")
    assert not back_cfg.project_text and isinstance(back.text_proj, torch.nn.Identity)
    with torch.no_grad():
        assert torch.allclose(back.encode_text(ids, mask), want, atol=1e-6)
    locked = locking.lock(model, "ours", "text", 0)
    assert set(locked) == {n for n, _ in model.named_parameters() if n.startswith("text_tower.")}
    with pytest.raises(ValueError, match="embed_dim equal to the text tower's width \\(64\\)"):
        check_towers(tiny_cfg(text_model=str(tmp_path / "bert"), project_text=False))
    with pytest.raises(ValueError, match="project_text=False needs embed_dim"):
        DualEncoder(tiny_cfg(project_text=False, embed_dim=32), 300)   # the tiny BERT is 128 wide
    check_towers(cfg)


def test_image_tower_from_local_timm_checkpoint(tmp_path):
    torch.manual_seed(7)
    src = timm.create_model("test_efficientnet", num_classes=0)
    torch.save(src.state_dict(), tmp_path / "headless.pth")
    full = timm.create_model("test_efficientnet")  # with its 1000-way classifier
    torch.save(full.state_dict(), tmp_path / "full.pth")
    for path, ref in ((tmp_path / "headless.pth", src), (tmp_path / "full.pth", full)):
        model = DualEncoder(tiny_cfg(image_pretrained=str(path)), 50)
        got = model.image_tower.state_dict()
        want = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier")}
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (path.name, k)
    random_init = DualEncoder(tiny_cfg(), 50).image_tower.state_dict()
    assert not torch.equal(random_init["conv_stem.weight"], src.state_dict()["conv_stem.weight"])


def test_unwrap_ddp_like_wrapper():
    model = DualEncoder(tiny_cfg(), 50)
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert unwrap(wrapper) is model


def test_image_norm_from_timm_pretrained_cfg_and_override():
    from align_ray.model import MEAN, image_norm

    mean, std = image_norm(tiny_cfg(image_model="vit_base_patch16_clip_224"))
    assert mean == (0.48145466, 0.4578275, 0.40821073)  # CLIP's, from timm's pretrained_cfg
    assert image_norm(tiny_cfg())[0] == MEAN
    assert image_norm(tiny_cfg(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))) == ((0.5,) * 3, (0.5,) * 3)


def test_bf16_autocast_gives_float32_unit_embeddings():
    model = DualEncoder(tiny_cfg(), 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, _ = model(*_inputs())
    assert img.dtype == txt.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-4)


def test_a_few_steps_learn_the_pairing(tokenizer, dev_rows):
    """End-to-end sanity: real PNGs + trained WordPiece, 8 pairs, 15 AdamW steps -> loss drops and
    the pairs are retrieved (the towers, projections and loss are wired the right way round)."""
    from align_ray.model import ClipLoss, eval_transform, tokenize
    from align_ray.model.transforms import decode_rgb

    torch.manual_seed(0)
    model = DualEncoder(tiny_cfg(), len(tokenizer))
    tf = eval_transform(64, model.cfg.image_mean, model.cfg.image_std)
    pixels = torch.from_numpy(np.stack([tf(decode_rgb(b)) for b in dev_rows["image"][:8]]))
    enc = tokenize(tokenizer, dev_rows["text"][:8], 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = ClipLoss(0.1)
    losses = []
    for _ in range(15):
        loss = loss_fn(*model(pixels, enc["input_ids"], enc["attention_mask"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    model.eval()
    with torch.no_grad():
        img, txt, _ = model(pixels, enc["input_ids"], enc["attention_mask"])
    assert (txt @ img.T).argmax(1).eq(torch.arange(8)).float().mean() >= 0.375  # chance: 0.125


def test_mean_text_pooling_averages_the_unmasked_token_states():
    import pytest
    torch.manual_seed(0)
    model = DualEncoder(tiny_cfg(text_pooling="mean"), 100).eval()
    _, ids, mask = _inputs()
    with torch.no_grad():
        got = model.encode_text(ids, mask)
        h = model.text_tower(input_ids=ids, attention_mask=mask).last_hidden_state
        want = torch.stack([h[i, mask[i].bool()].mean(0) for i in range(len(ids))])
        want = torch.nn.functional.normalize(model.text_proj(want), dim=-1)
        assert torch.allclose(got, want, atol=1e-6)
        # what the padded positions hold does not matter
        other = ids.clone()
        other[mask == 0] = 7
        assert torch.allclose(model.encode_text(other, mask), got, atol=1e-6)
        # and it is not the [CLS] output
        cls = DualEncoder(tiny_cfg(), 100).eval()
        cls.load_state_dict(model.state_dict())
        assert not torch.allclose(cls.encode_text(ids, mask), got, atol=1e-3)
    with pytest.raises(ValueError, match="text_pooling"):
        tiny_cfg(text_pooling="max")
