"""Published dual encoders behind the :class:`~align_ray.model.pretrained.Embedder` interface.

``--model`` in eval, index and serve names one of three kinds (:func:`model_kind`):

* our own ``save_pretrained`` directory (``config.json`` with ``model_config``);
* a Hugging Face ``save_pretrained`` directory of ``AlignModel``, ``CLIPModel``, ``SiglipModel``
  or ``Siglip2Model`` (the class comes from ``config.json``'s ``model_type``), with its processor
  saved beside it, or a hub name ``ORG/NAME`` of one (read through the hub cache);
* ``open_clip:ARCH[:CHECKPOINT]``: an open_clip architecture (a built-in name, ``hf-hub:``/
  ``local-dir:`` names, or a path to a model-config ``.json``) and a checkpoint file.

Each wrapper is thin, as open_clip's tower wrappers are: the library's model and the library's
own preprocessing (the HF processor, open_clip's val transform and tokenizer), nothing of ours
in between, so the embeddings are the library's feature functions, L2-normalised.  Everything
downstream (index, Serve encoders, ``/v1/classify``, eval metrics) only sees the Embedder API.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from align_ray.model.pretrained import CONFIG_NAME, Embedder

OPEN_CLIP_PREFIX = "open_clip:"
# ORG/NAME that is no local path: a Hugging Face hub name (transformers fetches it into each
# process's own cache, so index actors and Serve replicas on any node load it themselves)
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-dir:/hf-hub: folder format
# model_type -> transformers class name; SigLIP pools the last token, so it was trained on
# text padded to a fixed length and must be fed that way ("max_length"), the others pool a
# position that padding does not move
HF_MODEL_TYPES = {"align": "AlignModel", "clip": "CLIPModel", "siglip": "SiglipModel",
                  "siglip2": "Siglip2Model"}
_TEXT_PADDING = {"siglip": "max_length", "siglip2": "max_length"}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class SpecError(ValueError):
    """A malformed ``--model`` value (the CLI turns it into exit code 2)."""


def resolve_spec(spec: str) -> str:
    """``spec`` with its local paths absolute (Ray actors may run elsewhere than the CLI's cwd).

    Also undoes a plain ``os.path.abspath`` of an ``open_clip:`` spec (``/cwd/open_clip:...``),
    which the index and Serve builders apply to ``--model`` as if it were always a directory."""
    i = spec.find("/" + OPEN_CLIP_PREFIX)
    if i >= 0 and os.path.abspath(spec[:i] + "/x") == spec[:i] + "/x":
        spec = spec[i + 1:]
    if spec.startswith(OPEN_CLIP_PREFIX):
        arch, ckpt = parse_open_clip(spec)
        arch = os.path.abspath(arch) if arch.endswith(".json") else arch
        if arch.startswith("local-dir:"):
            arch = "local-dir:" + os.path.abspath(arch[len("local-dir:"):])
        ckpt = os.path.abspath(ckpt) if ckpt and not ckpt.startswith("hf-hub:") else ckpt
        return OPEN_CLIP_PREFIX + arch + (f":{ckpt}" if ckpt else "")
    if "://" in spec or is_hub_name(spec):
        return spec
    spec = os.path.abspath(spec)
    # a folder in open_clip's own save format (train --init-from open_clip:... writes one)
    if os.path.isfile(os.path.join(spec, OPEN_CLIP_CONFIG)) and not os.path.isfile(
            os.path.join(spec, CONFIG_NAME)):
        return f"{OPEN_CLIP_PREFIX}local-dir:{spec}"
    return spec


def is_hub_name(spec: str) -> bool:
    return bool(_HUB_NAME.fullmatch(spec)) and not os.path.exists(spec)


def hf_config(spec: str) -> dict[str, Any]:
    """``config.json`` of a local dir, or of a hub name (fetched into the hub cache, or read
    from it offline); SpecError when neither has one."""
    if not is_hub_name(spec):
        return json.loads((Path(spec) / CONFIG_NAME).read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(spec, CONFIG_NAME)).read_text())
    except Exception as e:  # offline, unknown repo, no config.json: all mean "not a model here"
        raise SpecError(f"{spec}: no such local dir, and as a Hugging Face hub name its "
                        f"{CONFIG_NAME} could not be had ({type(e).__name__}: {str(e)[:300]}); "
                        "expected our own save_pretrained dir, a Hugging Face save_pretrained dir "
                        f"or hub name of {'/'.join(HF_MODEL_TYPES.values())}, or "
                        f"{OPEN_CLIP_PREFIX}ARCH[:CHECKPOINT]") from None


def model_kind(spec: str) -> str:
    """``"ours"``, ``"hf"`` or ``"open_clip"`` (from the prefix or the dir's ``config.json``)."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        return "open_clip"
    if "://" in spec:  # s3:// dirs: only our own format is read from object storage
        return "ours"
    hub = is_hub_name(spec)
    if not hub and not (Path(spec) / CONFIG_NAME).is_file():
        raise SpecError(f"{spec}: not a saved model (no {CONFIG_NAME}); expected our own "
                        "save_pretrained dir, a Hugging Face save_pretrained dir or hub name of "
                        f"{'/'.join(HF_MODEL_TYPES.values())}, or {OPEN_CLIP_PREFIX}ARCH[:CHECKPOINT]")
    meta = hf_config(spec)
    if "model_config" in meta:
        if hub:
            raise SpecError(f"{spec}: our own model format is read from a dir or s3://, not the hub")
        return "ours"
    mtype = meta.get("model_type")
    if mtype not in HF_MODEL_TYPES:
        raise SpecError(f"{spec}: unknown model_type {mtype!r} in {CONFIG_NAME}; expected one of "
                        f"{sorted(HF_MODEL_TYPES)} (or our own model_config)")
    if not hub and not any((Path(spec) / w).is_file() for w in HF_WEIGHTS):
        raise SpecError(f"{spec}: no weights file (expected one of {', '.join(HF_WEIGHTS)})")
    return "hf"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class NaFlexPacking:
    """SigLIP 2's NaFlex input as ONE float32 vector per image, so that it travels where every
    other model's ``[3,S,S]`` pixels travel (the Embedder's batches, Serve's dynamic batching, the
    index actors): ``pixel_values`` [P, D] (patches, padded to the processor's
    ``max_num_patches`` P), ``pixel_attention_mask`` [P] and ``spatial_shapes`` [2] (the patch
    grid kept for this image's aspect ratio), concatenated.  Both are exact in float32 (0/1 and
    small integers)."""

    def __init__(self, max_num_patches: int, patch_dim: int):
        self.P, self.D = int(max_num_patches), int(patch_dim)

    @property
    def size(self) -> int:
        return self.P * self.D + self.P + 2

    def pack(self, out: dict) -> torch.Tensor:
        return torch.cat([out["pixel_values"][0].reshape(-1).float(),
                          out["pixel_attention_mask"][0].float(), out["spatial_shapes"][0].float()])

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, pd = x.shape[0], self.P * self.D
        return {"pixel_values": x[:, :pd].reshape(n, self.P, self.D),
                "pixel_attention_mask": x[:, pd:pd + self.P].round().long(),
                "spatial_shapes": x[:, pd + self.P:].round().long()}

    @property
    def patch(self) -> int:
        return int(round((self.D / 3) ** 0.5))

    def from_square(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs of already normalised square crops ``[N,3,S,S]`` (fine-tuning's
        data path), cut into patches as the processor cuts an image of that size: each patch
        row-major, its values (row, column, channel), the grid row-major, padded to P."""
        n, c, h, w = pixels.shape
        p = self.patch
        gh, gw = h // p, w // p
        if gh * p != h or gw * p != w or gh * gw > self.P:
            raise ValueError(f"a {h}x{w} crop is not a grid of at most {self.P} {p}px patches")
        x = pixels.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, -1)
        values = torch.zeros(n, self.P, self.D, dtype=pixels.dtype, device=pixels.device)
        values[:, :gh * gw] = x
        mask = torch.zeros(n, self.P, dtype=torch.long, device=pixels.device)
        mask[:, :gh * gw] = 1
        shapes = torch.tensor([[gh, gw]] * n, dtype=torch.long, device=pixels.device)
        return {"pixel_values": values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


class HFDualEncoder(nn.Module):
    """An HF ``AlignModel`` / ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model``: its
    ``get_*_features``, L2-normalised (SigLIP 2's image input arrives packed: NaFlexPacking)."""

    def __init__(self, model: nn.Module, model_type: str, packing: NaFlexPacking | None = None):
        super().__init__()
        self.model, self.model_type, self.packing = model, model_type, packing
        self._text_args = set(inspect.signature(model.get_text_features).parameters)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.packing is not None:
            return _unit(_features(self.model.get_image_features(**self.packing.unpack(pixels))))
        return _unit(_features(self.model.get_image_features(pixel_values=pixels)))

    def encode_text(self, **tokens: torch.Tensor) -> torch.Tensor:
        tokens = {k: v for k, v in tokens.items() if k in self._text_args}
        return _unit(_features(self.model.get_text_features(**tokens)))

    @property
    def temperature(self) -> torch.Tensor:
        if self.model_type == "align":  # ALIGN divides by its learnt temperature
            return self.model.temperature.detach()
        return 1.0 / self.model.logit_scale.detach().exp()  # CLIP/SigLIP multiply by exp(scale)


class OpenClipDualEncoder(nn.Module):
    """An open_clip model: ``encode_image`` / ``encode_text`` with ``normalize=True``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True).float()

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, normalize=True).float()

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.model.logit_scale.detach().exp()


class ExternalEmbedder(Embedder):
    """The Embedder API over a library model: ``tokenize(texts) -> dict of tensors`` and
    ``image_transform(PIL) -> [3,H,W]`` are the library's own; decoding, batching and the
    ``[N,3,S,S]`` pixel hand-off (Serve's image batching) are the Embedder's."""

    def __init__(self, model: nn.Module, tokenize: Callable[[list[str]], dict],
                 image_transform: Callable[[Image.Image], Any], device: str = "cpu",
                 batch_size: int = 64, name: str = "") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenize, self.image_transform = tokenize, image_transform
        self.batch_size, self.name = int(batch_size), name
        self.tokenizer = self.cfg = None  # no ModelConfig: the library owns these
        probe = self.transform(Image.new("RGB", (32, 32)))
        packing = getattr(model, "packing", None)
        if packing is not None:     # SigLIP 2: one packed vector
            if probe.shape != (packing.size,):
                raise SpecError(f"{name}: packed NaFlex input has shape {probe.shape}, "
                                f"expected ({packing.size},)")
            self._image_size = int(model.image_size_hint)
        elif probe.ndim != 3 or probe.shape[0] != 3 or probe.shape[1] != probe.shape[2]:
            raise SpecError(f"{name}: image preprocessing gives {probe.shape}, expected [3,S,S]")
        else:
            self._image_size = int(probe.shape[-1])
        self._dim = int(self.embed_texts(["a"]).shape[1])
        image_dim = int(self.embed_pixels(probe[None]).shape[1])
        if image_dim != self._dim:  # no shared space: nothing downstream could compare them
            raise SpecError(f"{name}: image embeddings have dim {image_dim}, text {self._dim}")

    def transform(self, img: Image.Image) -> np.ndarray:
        out = self.image_transform(img)
        return np.asarray(out.numpy() if isinstance(out, torch.Tensor) else out, np.float32)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def decode_draft(self) -> None:
        """Every pixel: the contract is the library's own embeddings, and the library's processor
        resizes a fully decoded image.  A DCT draft hands it other pixels (a large JPEG's
        embedding moved; tests/model/test_external.py), so the faster decode is not used."""
        return None

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        bs = batch_size or self.batch_size
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), bs):
                enc = {k: v.to(self.device) for k, v in self.tokenize(texts[i:i + bs]).items()}
                out.append(self.model.encode_text(**enc).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False) if out else self._empty()



def _hf_loader(spec: str, model_type: str) -> tuple[nn.Module, Callable, Callable]:
    import transformers

    cls = getattr(transformers, HF_MODEL_TYPES[model_type])
    try:
        model, info = cls.from_pretrained(spec, output_loading_info=True)
    except (OSError, RuntimeError) as e:  # unreadable weights, or shapes for another config
        raise SpecError(f"{spec}: cannot load {cls.__name__}: {e}") from e
    if info.get("missing_keys") or info.get("mismatched_keys"):
        # transformers would random-init these silently: the weights are another architecture's
        missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
        raise SpecError(f"{spec}: weights do not fit {cls.__name__} from {CONFIG_NAME} "
                        f"(missing or mismatched: {missing[:5]}...)")
    try:
        proc = transformers.AutoProcessor.from_pretrained(spec)
    except (OSError, ValueError, TypeError) as e:
        raise SpecError(f"{spec}: no usable processor saved with the model "
                        f"(processor_config / tokenizer files): {e}") from e
    tok, improc = proc.tokenizer, proc.image_processor
    text_cfg = model.config.text_config
    max_len = int(getattr(text_cfg, "max_position_embeddings", 0) or tok.model_max_length)
    padding = _TEXT_PADDING.get(model_type, True)

    def tokenize(texts: list[str]) -> dict:
        return dict(tok(texts, padding=padding, truncation=True, max_length=max_len, return_tensors="pt"))

    if model_type == "siglip2":
        packing = NaFlexPacking(improc.max_num_patches, improc.patch_size ** 2 * 3)
        encoder = HFDualEncoder(model, model_type, packing)
        # the side a square image is resized to: the square crops a fine-tune trains on
        encoder.image_size_hint = improc.patch_size * int(improc.max_num_patches ** 0.5)

        def image_transform(img: Image.Image):
            return packing.pack(improc(images=[img], return_tensors="pt"))

        return encoder, tokenize, image_transform

    def image_transform(img: Image.Image):
        return improc(images=[img], return_tensors="pt")["pixel_values"][0]

    return HFDualEncoder(model, model_type), tokenize, image_transform


def parse_open_clip(spec: str) -> tuple[str, str | None]:
    """``open_clip:ARCH[:CHECKPOINT]`` -> (arch, checkpoint); ARCH may itself carry a schema
    (``hf-hub:org/repo``, ``local-dir:/path``), which then names the weights too."""
    rest = spec[len(OPEN_CLIP_PREFIX):]
    for schema in ("hf-hub:", "local-dir:"):
        if rest.startswith(schema):
            return rest, None
    arch, _, ckpt = rest.partition(":")
    if not arch:
        raise SpecError(f"{spec}: expected {OPEN_CLIP_PREFIX}ARCH[:CHECKPOINT]")
    return arch, ckpt or None


def _open_clip_arch(arch: str) -> str:
    """The registered name of ``arch``; a ``.json`` model config is registered (in this process:
    Ray actors call this too) under its file stem."""
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")):
        return arch
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise SpecError(f"open_clip model config {arch} does not exist")
        open_clip.add_model_config(arch)
        return Path(arch).stem
    if arch not in open_clip.list_models():
        raise SpecError(f"unknown open_clip architecture {arch!r}: expected a name from "
                        "open_clip.list_models(), hf-hub:ORG/REPO, local-dir:DIR or a model-config .json")
    return arch


def _open_clip_loader(spec: str) -> tuple[nn.Module, Callable, Callable]:
    import open_clip

    arch, ckpt = parse_open_clip(spec)
    name = _open_clip_arch(arch)
    if ckpt and not ckpt.startswith("hf-hub:") and not os.path.isfile(ckpt):
        raise SpecError(f"{spec}: checkpoint file {ckpt} does not exist")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=ckpt)
    except (RuntimeError, AssertionError, KeyError) as e:
        # load_state_dict(strict=True) and open_clip's resizing asserts: another architecture's weights
        raise SpecError(f"{spec}: checkpoint does not fit open_clip architecture {name}: "
                        f"{str(e)[:500]}") from e
    tok = open_clip.get_tokenizer(name)
    return OpenClipDualEncoder(model), (lambda texts: {"input_ids": tok(texts)}), preprocess


def load_external(spec: str, device: str = "cpu", batch_size: int = 64) -> ExternalEmbedder:
    """An :class:`ExternalEmbedder` for an HF dir or an ``open_clip:`` spec; SpecError if malformed."""
    spec = resolve_spec(spec)
    kind = model_kind(spec)
    if kind == "open_clip":
        model, tokenize, transform = _open_clip_loader(spec)
    elif kind == "hf":
        model, tokenize, transform = _hf_loader(spec, hf_config(spec)["model_type"])
    else:
        raise SpecError(f"{spec}: our own model format, load it with Embedder.load")
    return ExternalEmbedder(model, tokenize, transform, device=device, batch_size=batch_size, name=spec)
