"""Fine-tuning from a saved or published dual encoder: ``align-ray train --init-from MODEL``.

MODEL is any ``--model`` kind (align_ray/model/external.py): our own dir, a Hugging Face
``save_pretrained`` dir of ``AlignModel`` / ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model``, or
``open_clip:ARCH[:CKPT]``.  Training keeps the source's architecture, temperature (ALIGN's
``temperature``, ``1 / exp(logit_scale)`` for the others) and, for SigLIP, its ``logit_bias``
with the sigmoid loss; the loss itself is the unchanged gathered-negative one (loss.py).

Preprocessing decision (the Ray Data ingest, ingest.py):

* Text: the source's own tokenizer (the HF dir's tokenizer, open_clip's ``get_tokenizer``,
  our dir's saved tokenizer), padded to a fixed length (the text tower's
  ``max_position_embeddings``, open_clip's context length) because Ray Data batches need one
  shape.  Padding does not change the embeddings: ALIGN pools [CLS], CLIP the first EOS, SigLIP
  was trained padded to that length, open_clip always pads to its context length.
* Images: our augmentation (random resized crop ``crop_scale`` + flip; validation: resize the
  shorter side + centre crop) at the source's image size, then the source's own normalisation.
  Size, mean and std are *measured* from the source's preprocessing (the HF image processor,
  open_clip's val transform) on constant images, so every per-channel affine normalisation
  (ImageNet, CLIP's, SigLIP's 0.5, EfficientNet's rescale offset) is reproduced exactly without
  knowing each processor's options.  SigLIP 2's NaFlex processor makes patch grids, not
  square images: it trains on square crops of side ``patch x floor(sqrt(max_num_patches))``,
  cut into the grid the processor gives a square image (:func:`_naflex_affine`).  The saved
  model is then evaluated and served with the library's own preprocessing (load_embedder), as
  any published model is.

Saving keeps the source's format (:func:`save_model`): HF ``save_pretrained`` of the model class
plus the processor; open_clip as a ``local-dir:`` folder (``open_clip_config.json`` +
``open_clip_pytorch_model.bin``, a plain state_dict that
``open_clip.create_model_and_transforms(ARCH, pretrained=FILE)`` also loads); our own unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from align_ray.model import external, locking
from align_ray.model.external import HFDualEncoder, OpenClipDualEncoder, SpecError

log = logging.getLogger(__name__)
OPEN_CLIP_CONFIG = external.OPEN_CLIP_CONFIG
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
_PREPARED: dict[str, dict[str, Any]] = {}  # spec -> the ModelConfig fields measured from it


def kind_of(cfg) -> str:
    """``"ours"`` (also for a fresh model), ``"hf"`` or ``"open_clip"``."""
    return external.model_kind(cfg.init_from) if cfg.init_from else "ours"


class _Trainable:
    """What the training loop needs on top of the inference wrappers: ``forward`` returning
    (image emb, text emb, temperature) with the temperature *differentiable* (learnt on), and
    clamped like ours at ``temperature_min`` (0.01 = CLIP's logit_scale clamp at log 100)."""

    tmin: float

    def forward(self, pixels, input_ids, attention_mask):
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.temperature

    @property
    def logit_bias(self) -> torch.Tensor:
        bias = getattr(self.model, "logit_bias", None)
        if bias is None:  # getattr(model, "logit_bias", None) in build_loss then gives None
            raise AttributeError("logit_bias")
        return bias


class TrainableHF(_Trainable, HFDualEncoder):
    def __init__(self, model: nn.Module, model_type: str, use_mask: bool, tmin: float,
                 packing: external.NaFlexPacking | None = None):
        HFDualEncoder.__init__(self, model, model_type, packing)
        self.use_mask, self.tmin = use_mask, tmin

    def encode_image(self, pixels):
        if self.packing is None:
            return HFDualEncoder.encode_image(self, pixels)
        # SigLIP 2: the ingest's square crops, cut into the NaFlex patch grid here
        return external._unit(external._features(
            self.model.get_image_features(**self.packing.from_square(pixels))))

    def encode_text(self, input_ids, attention_mask=None):
        # only where the tokenizer makes one (a SigLIP tokenizer may not: trained unmasked)
        mask = {"attention_mask": attention_mask} if self.use_mask and attention_mask is not None else {}
        return HFDualEncoder.encode_text(self, input_ids=input_ids, **mask)

    @property
    def temperature(self) -> torch.Tensor:
        if self.model_type == "align":
            return self.model.temperature.clamp(min=self.tmin)
        return (-self.model.logit_scale.clamp(max=-math.log(self.tmin))).exp()


class TrainableOpenClip(_Trainable, OpenClipDualEncoder):
    def __init__(self, model: nn.Module, tmin: float):
        OpenClipDualEncoder.__init__(self, model)
        self.tmin = tmin

    def encode_text(self, input_ids, attention_mask=None):
        return OpenClipDualEncoder.encode_text(self, input_ids)  # open_clip takes no mask

    @property
    def temperature(self) -> torch.Tensor:
        return (-self.model.logit_scale.clamp(max=-math.log(self.tmin))).exp()


def _pixel_affine(transform: Callable[[Image.Image], Any]) -> tuple[int, tuple, tuple]:
    """(size, mean, std) of a preprocessing, measured on constant grey images: the output of a
    per-channel affine normalisation is ``a*v + b`` for grey level v, so mean = -b/(255a) and
    std = 1/(255a) in our ``(pixel - 255 mean) / (255 std)`` (loop.Normalize)."""
    out = {}
    for v in (0, 128, 255):
        arr = transform(Image.new("RGB", (48, 40), (v, v, v)))
        arr = np.asarray(arr.numpy() if isinstance(arr, torch.Tensor) else arr, np.float64)
        out[v] = arr.reshape(3, -1).mean(1)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise SpecError("the model's image preprocessing does not give a square image (got "
                        f"shape {arr.shape}); cannot reproduce it in training")
    return (int(arr.shape[-1]), *_affine(out))


def _affine(out: dict[int, np.ndarray]) -> tuple[tuple, tuple]:
    """(mean, std) from the per-channel outputs for grey levels 0, 128 and 255."""
    a = (out[255] - out[0]) / 255.0
    if np.any(np.abs(a) < 1e-9) or \
            not np.allclose(out[128], a * 128 + out[0], atol=2e-3 * np.abs(a).max() * 255):
        raise SpecError("the model's image preprocessing is not a per-channel affine map; "
                        "cannot reproduce it in training")
    return tuple((-out[0] / (255 * a)).tolist()), tuple((1 / (255 * a)).tolist())


def _naflex_affine(emb) -> tuple[int, tuple, tuple]:
    """SigLIP 2 (NaFlex): fine-tuning feeds square crops of side S = patch x floor(sqrt(max
    patches)), the grid the processor gives a square image, cut into patches by
    ``NaFlexPacking.from_square``.  (S, mean, std) are measured as in :func:`_pixel_affine`,
    from the processor's patches of constant grey S x S images."""
    packing, size = emb.model.packing, int(emb.model.image_size_hint)
    out = {}
    for v in (0, 128, 255):
        got = packing.unpack(emb.image_transform(Image.new("RGB", (size, size), (v, v, v)))[None])
        grid = size // packing.patch
        if got["spatial_shapes"][0].tolist() != [grid, grid]:
            raise SpecError(f"the NaFlex processor cuts a {size}px square into "
                            f"{got['spatial_shapes'][0].tolist()} patches, not {grid}x{grid}")
        rows = got["pixel_values"][0][got["pixel_attention_mask"][0] == 1]
        out[v] = rows.reshape(-1, 3).double().mean(0).numpy()   # (row, column, channel) order
    return (size, *_affine(out))


def prepare(cfg) -> None:
    """Driver side, before Ray Data or Train see ``cfg``: check ``init_from`` (SpecError, a
    ValueError: the CLI's exit 2) and set ``cfg.model`` from the source: image size/mean/std,
    text length, loss (SigLIP's bias: sigmoid loss).  Cached per spec: ``train.run.check``
    calls it before Ray starts for every run, and a process may run several."""
    if not cfg.init_from:
        return
    from align_ray.model.config import ModelConfig
    from align_ray.model.pretrained import _read_meta, check_model_spec

    spec = cfg.init_from = external.resolve_spec(str(cfg.init_from))
    if spec not in _PREPARED:
        try:
            check_model_spec(spec)
            kind = external.model_kind(spec)
        except SpecError as e:
            raise SpecError(f"init_from: {e}") from e
        if kind == "ours":
            if "://" in spec:
                raise SpecError(f"init_from {spec}: our own format is read from a local dir here")
            src = ModelConfig.from_dict(_read_meta(Path(spec))["model_config"])
            fields = {**src.to_dict(), "siglip": src.loss == "siglip"}
        else:
            emb = external.load_external(spec, batch_size=1)
            if getattr(emb.model, "packing", None) is not None:
                size, mean, std = _naflex_affine(emb)     # SigLIP 2: square crops
            else:
                size, mean, std = _pixel_affine(emb.image_transform)
            inner = emb.model.model
            bias = getattr(inner, "logit_bias", None)
            fields = {"image_size": size, "image_mean": mean, "image_std": std,
                      "max_length": _text_length(spec, inner), "siglip": bias is not None}
        _PREPARED[spec] = fields
    fields = dict(_PREPARED[spec])
    siglip = fields.pop("siglip")
    if cfg.loss == "siglip" and not siglip:
        raise SpecError(f"init_from {spec}: loss siglip needs a model with a logit bias "
                        "(a SigLIP model, or one of ours trained with loss siglip)")
    cfg.loss = "siglip" if siglip else "infonce"  # the source's loss: SigLIP's bias is part of it
    if kind_of(cfg) == "ours":
        cfg.model = ModelConfig.from_dict({**fields, "loss": "siglip" if siglip else "clip",
                                           "label_smoothing": cfg.label_smoothing})
    else:
        for k, v in fields.items():
            setattr(cfg.model, k, v)
        cfg.model.loss = "siglip" if siglip else "clip"


def _text_length(spec: str, model: nn.Module) -> int:
    if spec.startswith(external.OPEN_CLIP_PREFIX):
        return int(model.context_length)
    text_cfg = model.config.text_config
    return int(getattr(text_cfg, "max_position_embeddings", 0) or 64)


def text_tokenizer(spec: str, max_length: int) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
    """The source's tokenizer for the ingest workers: texts -> (input_ids, attention_mask), int64
    [n, max_length].  open_clip has no mask (its text tower attends causally to a fixed length)."""
    if external.model_kind(spec) == "open_clip":
        import open_clip

        tok = open_clip.get_tokenizer(external._open_clip_arch(external.parse_open_clip(spec)[0]))

        def oc(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            ids = np.asarray(tok(texts), np.int64)
            return ids, np.ones_like(ids)
        return oc
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(spec)

    def enc(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = hf(texts, padding="max_length", truncation=True, max_length=max_length,
                 return_tensors="np", return_token_type_ids=False)
        ids = out["input_ids"].astype(np.int64)
        return ids, np.asarray(out.get("attention_mask", np.ones_like(ids)), np.int64)
    return enc


def build_model(cfg, vocab_size: int) -> nn.Module:
    """The model to train (workers) or to export into (driver): a fresh DualEncoder, or the
    ``init_from`` source with its own weights, ready for ``forward(pixels, ids, mask)``."""
    from align_ray.model.dual_encoder import DualEncoder

    kind = kind_of(cfg)
    if not cfg.init_from:
        return DualEncoder(cfg.model, vocab_size)
    if kind == "ours":
        from align_ray.model.pretrained import load_pretrained

        return load_pretrained(cfg.init_from)[0]
    tmin = cfg.model.temperature_min
    if kind == "open_clip":
        model, _, _ = external._open_clip_loader(cfg.init_from)
        return TrainableOpenClip(model.model, tmin)
    mtype = external.hf_config(cfg.init_from)["model_type"]
    from transformers import AutoTokenizer

    use_mask = "attention_mask" in AutoTokenizer.from_pretrained(cfg.init_from).model_input_names
    enc = external._hf_loader(cfg.init_from, mtype)[0]
    return TrainableHF(enc.model, mtype, use_mask, tmin, enc.packing)


def prepare_for_training(model: nn.Module, cfg) -> dict[str, int]:
    """Lock towers (locking.py) and freeze the parameters no embedding depends on (ALIGN's BERT
    pooler, say): DDP would otherwise wait for their gradients for ever.  Found by one dry
    forward/backward in eval mode (no BatchNorm statistics move); returns parameter counts."""
    counts = locking.apply_locks(model, kind_of(cfg), cfg)
    was = model.training
    model.eval()
    S, L = cfg.model.image_size, cfg.model.max_length
    img, txt, temp = model(torch.zeros(2, 3, S, S), torch.ones(2, L, dtype=torch.long),
                           torch.ones(2, L, dtype=torch.long))
    bias = getattr(model, "logit_bias", None)
    (img.sum() + txt.sum() + temp + (bias if bias is not None else 0)).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    model.train(was)
    if unused:
        log.info("train: %d parameter tensor(s) outside the embedding path frozen: %s",
                 len(unused), unused[:4])
    return {**counts, "unused": len(unused)}


def source_tokenizer(cfg) -> tuple[Any, dict[str, bytes]]:
    """(tokenizer, its files for the ingest) of an ``init_from`` of ours; (None, {}) for a
    library model, whose ingest loads the source's tokenizer itself (:func:`text_tokenizer`)."""
    if kind_of(cfg) != "ours":
        return None, {}
    from align_ray.model.tokenizer import load_tokenizer
    from align_ray.train.preprocess import tokenizer_files

    tok = load_tokenizer(cfg.init_from, max_length=cfg.model.max_length)
    return tok, tokenizer_files(tok)


def save_model(model: nn.Module, cfg, tokenizer, out: str) -> str:
    """Save ``model`` in its source's format; returns what ``--model`` takes for it."""
    from align_ray.model.dual_encoder import unwrap

    model, kind = unwrap(model), kind_of(cfg)
    if kind == "ours":
        from align_ray.model.pretrained import save_pretrained

        return save_pretrained(model, tokenizer, model.cfg, out)
    os.makedirs(out, exist_ok=True)
    if kind == "hf":
        from transformers import AutoProcessor

        model.model.save_pretrained(out)
        AutoProcessor.from_pretrained(cfg.init_from).save_pretrained(out)
        return out
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf

    name = external._open_clip_arch(external.parse_open_clip(cfg.init_from)[0])
    save_config_for_hf(model.model, Path(out) / OPEN_CLIP_CONFIG, open_clip.get_model_config(name))
    torch.save({k: v.detach().cpu() for k, v in model.model.state_dict().items()},
               os.path.join(out, OPEN_CLIP_WEIGHTS))
    tok = open_clip.get_tokenizer(name)
    if hasattr(tok, "save_pretrained"):  # an HF tokenizer: local-dir: loads it from the folder
        tok.save_pretrained(out)
    return out
