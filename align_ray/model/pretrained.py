"""``save_pretrained`` / ``load_pretrained`` and the ``Embedder`` used by eval, index and serve.

A saved directory holds ``config.json`` (format version, ``ModelConfig`` with the resolved image
mean/std, vocabulary size, the text tower's full HF config), ``model.safetensors`` and the tokenizer
files. Loading rebuilds both towers from that config alone (no hub, no checkpoint file, no training
state), so it works with ``HF_HUB_OFFLINE=1`` even when training started from a hub model.
Local paths and ``s3://`` URIs (through :mod:`align_ray.storage`) are both accepted.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from align_ray import storage
from align_ray.model.config import FORMAT_VERSION, ModelConfig
from align_ray.model.dual_encoder import DualEncoder, unwrap
from align_ray.model.tokenizer import load_tokenizer, tokenize
from align_ray.model.transforms import decode_rgb, eval_pixels, image_norm, normalize

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _save_local(model: DualEncoder, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()  # with the image mean/std the model resolved (timm pretrained_cfg)
    mean, std = image_norm(getattr(model, "cfg", cfg))
    cfg_dict["image_mean"], cfg_dict["image_std"] = list(mean), list(std)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_config": cfg_dict,
        "vocab_size": int(model.vocab_size),
        "text_tower_config": model.text_tower.config.to_dict(),
        "image_num_features": int(model.image_tower.num_features),
    }
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage (tied weights).
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def save_pretrained(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, out_dir: str | os.PathLike
) -> str:
    """Write config.json + model.safetensors + tokenizer files to ``out_dir`` (local or s3://)."""
    model = unwrap(model)
    out = str(out_dir)
    if not out.startswith("s3://"):
        _save_local(model, tokenizer, cfg, Path(out))
        return out
    fs, base = storage.filesystem(out)
    with tempfile.TemporaryDirectory() as tmp:
        _save_local(model, tokenizer, cfg, Path(tmp))
        for f in sorted(Path(tmp).iterdir()):
            storage.write_bytes(fs, storage.join(base, f.name), f.read_bytes())
    return out


def _read_meta(local: Path) -> dict[str, Any]:
    meta = json.loads((local / CONFIG_NAME).read_text())
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{local}: format_version {meta['format_version']} is newer than {FORMAT_VERSION}")
    return meta


def _load_local(local: Path, device: str) -> tuple[DualEncoder, PreTrainedTokenizerBase, ModelConfig]:
    if not (local / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{local} is not a saved model (no {CONFIG_NAME})")
    meta = _read_meta(local)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = DualEncoder(
        cfg, int(meta["vocab_size"]), init_pretrained=False, text_config=meta["text_tower_config"]
    )
    model.load_state_dict(load_file(str(local / WEIGHTS_NAME), device="cpu"), strict=True)
    tokenizer = load_tokenizer(str(local), max_length=cfg.max_length)
    return model.to(device).eval(), tokenizer, model.cfg


def load_pretrained(
    model_dir: str | os.PathLike, device: str = "cpu"
) -> tuple[DualEncoder, PreTrainedTokenizerBase, ModelConfig]:
    """Rebuild ``(model (eval mode), tokenizer, cfg)`` from a ``save_pretrained`` dir (local or s3://)."""
    src = str(model_dir)
    if not src.startswith("s3://"):
        return _load_local(Path(src), device)
    fs, base = storage.filesystem(src)
    with tempfile.TemporaryDirectory() as tmp:
        for path in storage.list_files(fs, base):
            rel = path[len(base.rstrip("/")) + 1 :] if path.startswith(base) else os.path.basename(path)
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(storage.read_bytes(fs, path))
        return _load_local(Path(tmp), device)


class Embedder:
    """Inference wrapper: texts / image bytes -> L2-normalised float32 NumPy embeddings.

    Batches internally (``batch_size``), runs under ``torch.inference_mode``.  Images go through
    :meth:`transform`: the evaluation view training validates on (resize shorter side + centre
    crop at ``cfg.image_size`` to uint8, then the tower's mean/std; see model/transforms.py).
    """

    def __init__(
        self,
        model: DualEncoder,
        tokenizer: PreTrainedTokenizerBase,
        cfg: ModelConfig,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.model = unwrap(model).to(device).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.mean, self.std = image_norm(cfg)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 64) -> "Embedder":
        model, tokenizer, cfg = load_pretrained(model_dir, device=device)
        return cls(model, tokenizer, cfg, device=device, batch_size=batch_size)

    def transform(self, img: Image.Image) -> np.ndarray:
        """One decoded image -> the model's float32 input [3,S,S], exactly as training's
        validation rows reach the model (uint8 from the data workers, normalised on device)."""
        return normalize(eval_pixels(img, self.image_size), self.mean, self.std)

    @property
    def dim(self) -> int:
        return int(self.cfg.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    @property
    def decode_draft(self) -> int | None:
        """The smallest side a JPEG may be decoded at (libjpeg's DCT scaling, ``decode_rgb``'s
        ``draft``) before this model's preprocessing; None = decode every pixel.  Our models'
        preprocessing is ours, so it may start from the draft."""
        return self.image_size

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        texts = list(texts)
        bs = batch_size or self.batch_size
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), bs):
                enc = tokenize(self.tokenizer, texts[i : i + bs], self.cfg.max_length)
                emb = self.model.encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
                out.append(emb.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False) if out else self._empty()

    def preprocess(self, images: Sequence[bytes | Image.Image], start: int = 0) -> np.ndarray:
        """Decode (bytes) + eval transform -> float32 [N,3,S,S]; ValueError names the bad index."""
        arrs = []
        for j, item in enumerate(images):
            try:
                img = item if isinstance(item, Image.Image) else decode_rgb(item, draft=self.decode_draft)
                arrs.append(self.transform(img))
            except ValueError as e:
                raise ValueError(f"image at index {start + j}: {e}") from e
        return np.stack(arrs) if arrs else np.zeros((0, 3, self.image_size, self.image_size), np.float32)

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Already-transformed pixels [N,3,S,S] -> embeddings."""
        bs = batch_size or self.batch_size
        x = torch.as_tensor(pixels, dtype=torch.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], bs):
                out.append(self.model.encode_image(x[i : i + bs].to(self.device)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False) if out else self._empty()

    def embed_images(self, images: Sequence[bytes | Image.Image], batch_size: int | None = None) -> np.ndarray:
        images = list(images)
        bs = batch_size or self.batch_size
        out = [self.embed_pixels(self.preprocess(images[i : i + bs], start=i), bs) for i in range(0, len(images), bs)]
        return np.concatenate(out) if out else self._empty()


def load_embedder(spec: str | os.PathLike, device: str = "cpu", batch_size: int = 64) -> Embedder:
    """The one entry point of eval, index and serve: our own dir, a Hugging Face dir or an
    ``open_clip:`` spec (see :mod:`align_ray.model.external`), each behind the Embedder API."""
    from align_ray.model import external

    spec = external.resolve_spec(str(spec))
    if external.model_kind(spec) == "ours":
        return Embedder.load(spec, device=device, batch_size=batch_size)
    return external.load_external(spec, device=device, batch_size=batch_size)


def check_model_spec(spec: str | os.PathLike) -> int | None:
    """Fail fast (before Ray starts) on a malformed ``--model``; returns the embedding dim where
    known.  A library model is loaded once on CPU here: only loading shows weights that belong
    to another architecture (transformers would random-init the missing ones silently)."""
    from align_ray.model import external

    spec = external.resolve_spec(str(spec))
    if external.model_kind(spec) != "ours":
        return external.load_external(spec, device="cpu", batch_size=1).dim
    if "://" in spec:
        return None
    meta = _read_meta(Path(spec))
    if not (Path(spec) / WEIGHTS_NAME).is_file():
        raise external.SpecError(f"{spec}: no {WEIGHTS_NAME} beside {CONFIG_NAME}")
    return int(meta["model_config"]["embed_dim"])
