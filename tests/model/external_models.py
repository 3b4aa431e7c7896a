"""Tiny random-init published dual encoders, built offline with the real library classes and
saved the way their users save them (HF ``save_pretrained`` of model AND processor; an open_clip
model-config .json + ``state_dict`` checkpoint), plus each library's own reference embeddings.

No hub: tokenizers are built from a small word list.  SigLIP's own tokenizer (SiglipTokenizer)
needs ``sentencepiece``, which is not installed, so the tiny SigLIP is saved with a
``tokenizers``-built fast tokenizer; SiglipProcessor loads whatever tokenizer it was saved with.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported; Ray workers inherit it
KINDS = ("align", "clip", "siglip", "open_clip")      # every kind, fine-tuning included
EMBED_KINDS = (*KINDS, "siglip2")    # eval, index, serve (fine-tuning refuses SigLIP 2: NaFlex)
SIZE = 32
WORDS = ("a photo of the red green blue cat dog bird fish car tree house sun moon star picture "
         "small big face smiling grinning heart hand flag animal food").split()


def png(seed: int, size: int = 48) -> bytes:
    """A random RGB PNG (lossless: the same decoded pixels on every path)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size + 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(n)]


def _wordpiece():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def _bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocab with every byte, its end-of-word form and whole WORDS merged."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(sorted(alphabet) + [c + "</w>" for c in sorted(alphabet)])}
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        cur = w[0]
        for j, ch in enumerate(w[1:], 1):
            nxt = ch + "</w>" if j == len(w) - 1 else ch
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    return vocab, list(dict.fromkeys(merges))


def build_align(out: Path) -> str:
    from transformers import AlignConfig, AlignModel, AlignProcessor, EfficientNetImageProcessor

    tok = _wordpiece()
    cfg = AlignConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=32),
        vision_config=dict(image_size=SIZE, kernel_sizes=[3, 3], in_channels=[32, 16], out_channels=[16, 64],
                           strides=[1, 2], num_block_repeats=[1, 1], expand_ratios=[1, 6], hidden_dim=64,
                           width_coefficient=1.0, depth_coefficient=1.0),
        projection_dim=64,  # ALIGN has no image projection: the last block's channels are the dim
        temperature_init_value=0.5)  # not 1.0, so that T and 1/T differ
    torch.manual_seed(0)
    model = AlignModel(cfg).eval()
    with torch.no_grad():
        # a random 2-layer BERT gives every caption almost the same [CLS] vector, which would make
        # any ranking a coin toss: standardise the projection on some captions (still untrained)
        enc = tok(captions(64) + list(WORDS), padding=True, return_tensors="pt")
        feats = model.text_model(**enc).last_hidden_state[:, 0]
        proj = model.text_projection
        proj.weight.div_(feats.std(0).clamp_min(1e-6))
        proj.bias.copy_(-(proj.weight @ feats.mean(0)))
    model.save_pretrained(out)
    improc = EfficientNetImageProcessor(size={"height": SIZE, "width": SIZE},
                                        crop_size={"height": SIZE, "width": SIZE})
    AlignProcessor(image_processor=improc, tokenizer=tok).save_pretrained(out)
    return str(out)


def build_clip(out: Path) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = _bpe_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16,
                         eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"]),
        vision_config=dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=37),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(out)
    improc = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    CLIPProcessor(image_processor=improc, tokenizer=tok).save_pretrained(out)
    return str(out)


def _word_tokenizer():
    """A word-level fast tokenizer (SigLIP's sentencepiece tokenizers need the hub's model)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=16)


def build_siglip(out: Path) -> str:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tok = _word_tokenizer()
    vocab = tok.get_vocab()
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16, projection_size=32,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1),
        vision_config=dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=37))
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    with torch.no_grad():  # SigLIP's published init (scale log 10, bias -10), not a 0 that hides errors
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(out)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": SIZE, "width": SIZE}),
                    tokenizer=tok).save_pretrained(out)
    return str(out)


def build_siglip2(out: Path) -> str:
    """A tiny Siglip2Model with its NaFlex image processor (8 px patches, at most 16 of them:
    a patch grid that follows each image's aspect ratio)."""
    from transformers import (Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor,
                              Siglip2Tokenizer)

    # Siglip2Processor reloads its tokenizer as a Siglip2Tokenizer (Gemma's BPE, lowercasing,
    # "▁" for spaces), whatever was saved: so a real one, over a BPE vocab of whole WORDS
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"])}
    for ch in sorted({c for w in WORDS for c in w}):
        vocab.setdefault(ch, len(vocab))
    merges = []
    for w in WORDS:
        for cur, rest in (("▁", w), (w[0], w[1:])):    # mid-sentence and first word
            for ch in rest:
                merges.append((cur, ch))
                cur += ch
                vocab.setdefault(cur, len(vocab))
    tok = Siglip2Tokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=16)
    cfg = Siglip2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=16,
                         projection_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(patch_size=8, num_patches=16, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=37))
    torch.manual_seed(0)
    model = Siglip2Model(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(out)
    Siglip2Processor(image_processor=Siglip2ImageProcessor(patch_size=8, max_num_patches=16),
                     tokenizer=tok).save_pretrained(out)
    return str(out)


OPEN_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_open_clip(out: Path) -> str:
    """A tiny ViT + text transformer as a model-config .json and its state_dict checkpoint."""
    import open_clip

    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "tiny-clip-test.json"
    cfg.write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    torch.save(model.state_dict(), out / "tiny.pt")
    return f"open_clip:{cfg}:{out / 'tiny.pt'}"


BUILDERS = {"align": build_align, "clip": build_clip, "siglip": build_siglip,
            "open_clip": build_open_clip, "siglip2": build_siglip2}


def reference(spec: str, images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The library's own L2-normalised embeddings, computed with the library alone (its processor
    or transforms, its feature functions): what ours must equal."""
    def unit(x):
        x = x if isinstance(x, torch.Tensor) else x.pooler_output
        return torch.nn.functional.normalize(x.float(), dim=-1).numpy()

    with torch.no_grad():
        if spec.startswith("open_clip:"):
            import open_clip

            _, cfg, ckpt = spec.split(":")
            open_clip.add_model_config(cfg)
            model, _, pre = open_clip.create_model_and_transforms(Path(cfg).stem, pretrained=ckpt)
            tok = open_clip.get_tokenizer(Path(cfg).stem)
            img = model.encode_image(torch.stack([pre(i) for i in images]))
            return unit(img), unit(model.encode_text(tok(texts)))
        from transformers import AutoModel, AutoProcessor

        model, proc = AutoModel.from_pretrained(spec).eval(), AutoProcessor.from_pretrained(spec)
        siglip = model.config.model_type in ("siglip", "siglip2")
        enc = proc.tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                             max_length=16, return_tensors="pt")
        if model.config.model_type != "align":  # only BERT's get_text_features takes these
            enc.pop("token_type_ids", None)
        # pixel_values, and SigLIP 2's pixel_attention_mask and spatial_shapes
        pix = dict(proc.image_processor(images=images, return_tensors="pt"))
        return unit(model.get_image_features(**pix)), unit(model.get_text_features(**enc))


def assert_embeds_like(ours, ref, what: str = "") -> None:
    """``ours`` is the library's embedding ``ref`` row by row, judged against how far apart the
    library puts *different* inputs. A cosine bound alone (say >= 0.9999) proves little on a tiny
    random model whose embeddings all point almost one way (this CLIP's images sit at cosine
    0.94-0.99 of each other), so each row's error must be a small fraction of the distance from
    its reference to the nearest other one, and those distances must not be tiny."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    gaps = np.linalg.norm(ref[:, None] - ref[None], axis=2)
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.min(1)
    assert nearest.min() > 0.05, f"{what}: the library embeds different inputs alike ({nearest.min():.3g})"
    err = np.linalg.norm(ours - ref, axis=1)
    assert (err <= 1e-3 * nearest).all(), f"{what}: error / nearest gap {(err / nearest).max():.3g}"


_BUILT: dict[str, str] = {}


# Module scope, with the session-wide cache above: a session-scoped parametrized fixture makes
# pytest regroup the whole session by its parameter, interleaving tests/model with tests/serve,
# and the serve package's app was then torn down and deployed again for every model kind.
@pytest.fixture(scope="module", params=EMBED_KINDS)
def external_spec(request, tmp_path_factory) -> str:
    """``--model`` value of each tiny published model (built once per session)."""
    kind = request.param
    if kind not in _BUILT:
        _BUILT[kind] = BUILDERS[kind](tmp_path_factory.mktemp(f"ext-{kind}") / kind)
    return _BUILT[kind]


def library_logits(spec: str, images: list[Image.Image], texts: list[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """(image-text logits [I,T], cosines [I,T], bias) from the library's own forward pass: what
    ``/v1/classify``'s temperature must reproduce (logits = cosine / temperature + bias)."""
    with torch.no_grad():
        if spec.startswith("open_clip:"):
            import open_clip

            _, cfg, ckpt = spec.split(":")
            open_clip.add_model_config(cfg)
            model, _, pre = open_clip.create_model_and_transforms(Path(cfg).stem, pretrained=ckpt)
            img, txt, scale = model(torch.stack([pre(i) for i in images]),
                                    open_clip.get_tokenizer(Path(cfg).stem)(texts))[:3]
            cos = (img @ txt.T).numpy()
            return cos * float(scale), cos, 0.0
        from transformers import AutoModel, AutoProcessor

        model, proc = AutoModel.from_pretrained(spec).eval(), AutoProcessor.from_pretrained(spec)
        siglip = model.config.model_type in ("siglip", "siglip2")
        enc = proc.tokenizer(texts, padding="max_length" if siglip else True, truncation=True,
                             max_length=16, return_tensors="pt")
        if model.config.model_type != "align":
            enc.pop("token_type_ids", None)
        out = model(**dict(proc.image_processor(images=images, return_tensors="pt")), **enc)
        cos = (out.image_embeds @ out.text_embeds.T).numpy()
        bias = float(model.logit_bias) if siglip else 0.0
        return out.logits_per_image.numpy(), cos, bias
