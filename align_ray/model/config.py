"""``ModelConfig``: everything needed to rebuild the dual encoder (saved as ``config.json``).

Temperature: ``temperature_init=1.0`` is ALIGN-faithful and suits ~100k-step runs. Short runs (tests,
the demo, a few hundred steps) barely learn with it (measured: loss 4.15 -> 3.5 in 300 steps); use
CLIP's ``0.07`` there, which is what :meth:`ModelConfig.tiny` does.

Projection: ALIGN projects the text [CLS] state to the image tower's width and uses the pooled image
features as they are. Here ``embed_dim`` is configurable and both towers get a ``Linear`` projection
into it; ``project_image=False`` reproduces ALIGN exactly (then ``embed_dim`` must equal the image
tower's feature width, e.g. 1280 for ``efficientnet_b0``; see :meth:`ModelConfig.align`).
``project_text=False`` is the same on the text side: the pooled text state is the embedding, so
with ``embed_dim`` = the text width and ``lock_text`` a pretrained sentence encoder's own space
(all-MiniLM-L6-v2's 384-d, mean-pooled) is the shared space and the image tower learns into it.
A trainable projection can bend the text space around the training captions; the encoder's own
space keeps unseen captions where the encoder put them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


def _tiny_bert() -> dict[str, Any]:
    return dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=128,
    )


@dataclass
class ModelConfig:
    """Dual-encoder configuration (image tower: timm; text tower: Hugging Face encoder).

    image_model: any timm model name (ALIGN: EfficientNet). Built with ``num_classes=0`` (pooled).
    image_pretrained: ``None`` = random init; a local timm checkpoint file (state_dict saved with
        ``torch.save`` or safetensors); or ``"hub"`` = timm hub weights (needs network).
    text_model: ``None`` = random-init ``BertModel(BertConfig(**text_config))``; otherwise a HF hub name
        or a local ``save_pretrained`` directory, loaded with ``AutoModel.from_pretrained``.
    text_config: ``BertConfig`` kwargs for the random-init text tower (default: 2 layers, h=128);
        keys left out take ``BertConfig``'s defaults (BERT-base), ``vocab_size`` comes from the tokenizer.
    tokenizer: HF name/dir. ``None`` = the ``text_model``'s tokenizer when ``text_model`` is set,
        else a WordPiece vocabulary of ``vocab_size`` trained on the training texts.
    text_pooling: the text tower's output: ``"cls"`` (the ``[CLS]`` state: BERT's, ALIGN's) or
        ``"mean"`` (the mean of the unmasked token states: what sentence-transformers models such
        as all-MiniLM-L6-v2 were trained to output, so a pretrained one starts useful).
    temperature_init: 1.0 = ALIGN (long runs); 0.07 = CLIP (short runs, tests, demo).
    temperature_min: lower bound of the learnable temperature (it is clamped, cannot collapse).
    loss: ``"clip"`` (symmetric InfoNCE with label smoothing) or ``"siglip"`` (pairwise sigmoid; the
        learnable bias then lives in the model as ``DualEncoder.logit_bias``).
    image_mean/image_std: ``None`` = taken from the timm model's ``pretrained_cfg`` (ImageNet otherwise).
    """

    image_model: str = "efficientnet_b0"
    image_pretrained: str | None = None
    image_size: int = 224
    text_model: str | None = None
    text_config: dict = field(default_factory=_tiny_bert)
    tokenizer: str | None = None
    vocab_size: int = 8000
    max_length: int = 64
    text_pooling: str = "cls"
    embed_dim: int = 640
    temperature_init: float = 1.0
    temperature_min: float = 0.01
    project_image: bool = True
    project_text: bool = True
    loss: str = "clip"
    label_smoothing: float = 0.1
    siglip_bias_init: float = -10.0
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {self.loss!r}")
        if self.text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}")
        if not 0 < self.temperature_min <= self.temperature_init:
            raise ValueError("need 0 < temperature_min <= temperature_init")
        for name in ("image_size", "embed_dim", "max_length", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.image_mean is not None:
            self.image_mean = tuple(float(v) for v in self.image_mean)
        if self.image_std is not None:
            self.image_std = tuple(float(v) for v in self.image_std)

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """Test/demo-sized preset: efficientnet_b0 at 64 px, 2-layer h=128 BERT, embed_dim 128,
        temperature_init 0.07 (CLIP's; learns in a few hundred steps). Overrides win."""
        base: dict[str, Any] = dict(
            image_model="efficientnet_b0",
            image_size=64,
            text_config=_tiny_bert(),
            vocab_size=4000,
            embed_dim=128,
            temperature_init=0.07,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def align(cls, **overrides: Any) -> "ModelConfig":
        """ALIGN-faithful preset (long runs): EfficientNet, BERT-base-sized random text tower,
        text projected to the image width (no image projection), temperature 1.0."""
        base: dict[str, Any] = dict(
            image_model="efficientnet_b0",
            image_size=224,
            text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=512),
            vocab_size=30522,
            embed_dim=1280,
            project_image=False,
            temperature_init=1.0,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("image_mean", "image_std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown key(s) {unknown}")
        return cls(**data)
