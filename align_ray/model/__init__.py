"""The ALIGN dual encoder: config, transforms, tokenizer, model, save/load + Embedder, losses."""

from align_ray.model.config import ModelConfig
from align_ray.model.dual_encoder import DualEncoder, image_norm, unwrap
from align_ray.model.loss import ClipLoss, SigLipLoss, all_gather_with_grad, build_loss
from align_ray.model.pretrained import Embedder, load_pretrained, save_pretrained
from align_ray.model.tokenizer import build_tokenizer, load_tokenizer, tokenize, train_wordpiece
from align_ray.model.transforms import MEAN, STD, decode_rgb, eval_transform, train_transform

__all__ = [
    "MEAN", "STD", "ClipLoss", "DualEncoder", "SigLipLoss", "all_gather_with_grad", "build_loss", "Embedder", "ModelConfig", "build_tokenizer", "decode_rgb",
    "eval_transform", "image_norm", "load_pretrained", "load_tokenizer", "save_pretrained", "tokenize",
    "train_transform", "train_wordpiece", "unwrap",
]
