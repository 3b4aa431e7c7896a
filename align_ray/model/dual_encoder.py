"""The ALIGN dual encoder: a timm image tower and a Hugging Face text encoder in one space.

Image: ``timm.create_model(name, num_classes=0)`` -> globally pooled features -> ``Linear`` (or identity
with ``project_image=False``, ALIGN-exact) -> L2 norm. Text: encoder ``[CLS]`` (or mean-pooled)
state -> ``Linear`` (or identity with ``project_text=False``: the encoder's own space) -> L2 norm.
One learnable temperature, stored as its log and clamped below at ``temperature_min``
(``logits = sim / temperature``). With ``cfg.loss == "siglip"`` the model also owns the SigLIP
``logit_bias`` so DDP syncs it, the optimiser sees it and ``save_pretrained`` stores it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from align_ray.model.config import ModelConfig
from align_ray.model.transforms import image_norm


def build_image_tower(cfg: ModelConfig, init_pretrained: bool = True) -> nn.Module:
    """timm model with the classifier removed (``num_classes=0``: pooled features)."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    src = cfg.image_pretrained if init_pretrained else None
    if src is None:
        return timm.create_model(cfg.image_model, pretrained=False, **kwargs)
    if src == "hub":
        return timm.create_model(cfg.image_model, pretrained=True, **kwargs)
    # A local checkpoint file: timm loads it (state_dict / {"state_dict": ...} / safetensors) and
    # drops the classifier weights when the head differs from the file's.
    return timm.create_model(
        cfg.image_model, pretrained=True, pretrained_cfg_overlay=dict(file=str(src)), **kwargs
    )


def check_towers(cfg: ModelConfig) -> None:
    """ValueError, naming the setting, for a tower that cannot be built: an image tower timm
    does not know, an ``image_pretrained`` file that is not there, a ``text_model`` or
    ``tokenizer`` that is neither a loadable directory nor a hub name Hugging Face can resolve
    (offline: one in its cache).  Checked by ``align-ray train`` before Ray starts; otherwise
    each fails in every Ray Train worker, after the group has started, and is retried."""
    if not timm.is_model(cfg.image_model):
        close = difflib.get_close_matches(cfg.image_model, timm.list_models(), n=3)
        raise ValueError(f"model.image_model {cfg.image_model!r} is not a timm model"
                         + (f"; close names: {', '.join(close)}" if close else ""))
    src = cfg.image_pretrained
    if src not in (None, "hub") and not os.path.isfile(os.path.expanduser(str(src))):
        raise ValueError(f"model.image_pretrained {src!r}: no such file (a timm checkpoint "
                         "file, or 'hub')")
    from align_ray.model.tokenizer import load_tokenizer

    text_cfg = BertConfig(**cfg.text_config)   # the random-init tower's; a text_model's below
    for key, name, load in (("text_model", cfg.text_model, AutoConfig.from_pretrained),
                            # without its own tokenizer a text_model brings its vocabulary
                            ("tokenizer" if cfg.tokenizer else "text_model",
                             cfg.tokenizer or cfg.text_model, load_tokenizer)):
        if name is None:
            continue
        try:
            loaded = load(name)
        except (OSError, ValueError) as e:   # HF: OSError, or HFValidationError (a ValueError)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"model.{key} {name!r} cannot be loaded: a directory saved with "
                             "save_pretrained, or a hub name (offline: one in the Hugging "
                             f"Face cache). {first}") from None
        if load is not load_tokenizer:   # the text_model's config
            text_cfg = loaded
    if not cfg.project_text:
        width = text_cfg.hidden_size
        if width != cfg.embed_dim:
            raise ValueError(f"model.project_text false needs model.embed_dim equal to the text "
                             f"tower's width ({width}), got {cfg.embed_dim}")


def _drop_pooler(model: nn.Module) -> nn.Module:
    # An unused pooler breaks DDP ("parameters that were not used"; env pitfall 7).
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def build_text_tower(
    cfg: ModelConfig, vocab_size: int, init_pretrained: bool = True, text_config: dict | None = None
) -> nn.Module:
    """Random BERT from ``cfg.text_config``; ``AutoModel.from_pretrained(cfg.text_model)``; or, when
    ``text_config`` (a saved ``PretrainedConfig.to_dict()``) is given, an offline rebuild from it."""
    if text_config is not None:
        conf = AutoConfig.for_model(**text_config)
        try:
            model = AutoModel.from_config(conf, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_config(conf)
    elif cfg.text_model is None or not init_pretrained:
        if cfg.text_model is not None:
            raise ValueError("a pretrained text_model needs init_pretrained=True or a saved text_config")
        conf = BertConfig(**{**cfg.text_config, "vocab_size": vocab_size})
        model = BertModel(conf, add_pooling_layer=False)
    else:
        try:
            model = AutoModel.from_pretrained(cfg.text_model, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(cfg.text_model)
    model = _drop_pooler(model)
    if model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 (autocast) -> fp32 before normalising; float64 stays float64 (exactness tests).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _projection(on: bool, width: int, embed_dim: int, tower: str) -> nn.Module:
    """``Linear(width, embed_dim)``, or with ``project_<tower>=False`` the tower's own space."""
    if on:
        return nn.Linear(width, embed_dim)
    if width != embed_dim:
        raise ValueError(f"project_{tower}=False needs embed_dim == {tower} width ({width})")
    return nn.Identity()


class DualEncoder(nn.Module):
    """``forward(pixels, input_ids, attention_mask) -> (img [B,D], txt [B,D], temperature [])``."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        init_pretrained: bool = True,
        text_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = build_image_tower(cfg, init_pretrained)
        self.text_tower = build_text_tower(cfg, vocab_size, init_pretrained, text_config)
        img_width = int(self.image_tower.num_features)
        txt_width = int(self.text_tower.config.hidden_size)
        self.image_proj = _projection(cfg.project_image, img_width, cfg.embed_dim, "image")
        self.text_proj = _projection(cfg.project_text, txt_width, cfg.embed_dim, "text")
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))
        self._log_tmin = math.log(cfg.temperature_min)
        if cfg.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.siglip_bias_init)))
        mean, std = image_norm(cfg)
        self.cfg = dataclasses.replace(cfg, image_mean=mean, image_std=std)
        self.vocab_size = vocab_size

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def temperature(self) -> torch.Tensor:
        """Learnable scalar, clamped below at ``temperature_min`` (no gradient while clamped)."""
        return self.log_temperature.clamp(min=self._log_tmin).exp()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.image_tower(pixels)
        return F.normalize(_upcast(self.image_proj(feats)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.cfg.text_pooling == "mean":  # padding excluded; a row is never all padding
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            pooled = h[:, 0]
        return F.normalize(_upcast(self.text_proj(pooled)), dim=-1)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.temperature

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names that should get no weight decay: biases, norms, temperature, bias."""
        names = set()
        for n, p in self.named_parameters():
            if p.ndim <= 1 or n.endswith(".bias") or "norm" in n.lower():
                names.add(n)
        return names


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP/FSDP/compiled wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
