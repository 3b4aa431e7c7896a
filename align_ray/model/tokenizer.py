"""Tokenizers: a pretrained HF tokenizer, or a WordPiece vocabulary trained on the training texts.

The trained tokenizer is built with ``tokenizers`` (BERT normaliser with lower-casing, BERT
pre-tokenizer, ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``[CLS] ... [SEP]`` template) and wrapped with
``PreTrainedTokenizerFast(tokenizer_object=...)``. Never ``vocab_file=``: transformers 5 silently
ignores it and every token becomes ``[UNK]`` (env pitfall 13).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from align_ray.model.config import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if isinstance(t, str) and t:
            yield t


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 8000, max_length: int = 64, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a lower-cased BERT-style WordPiece tokenizer on ``texts`` (vocab capped by the corpus)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
    )
    tok.train_from_iterator(_strings(texts), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=max_length,
    )


def load_tokenizer(name_or_dir: str, max_length: int | None = None) -> PreTrainedTokenizerBase:
    """A saved or hub tokenizer (``AutoTokenizer``; fast when available)."""
    tok = AutoTokenizer.from_pretrained(name_or_dir)
    if max_length is not None:
        tok.model_max_length = max_length
    return tok


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 64) -> dict:
    """Batch-encode to torch tensors ``input_ids`` / ``attention_mask`` (padded to the longest)."""
    enc = tokenizer(
        [t if isinstance(t, str) else "" for t in texts],
        padding=True, truncation=True, max_length=max_length, return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def build_tokenizer(cfg: "ModelConfig", texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer ``cfg`` asks for: ``cfg.tokenizer``; else ``cfg.text_model``'s own (a pretrained
    text tower needs its vocabulary); else WordPiece trained on ``texts`` (required then)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.max_length)
    if cfg.text_model:
        return load_tokenizer(cfg.text_model, cfg.max_length)
    if texts is None:
        raise ValueError("a WordPiece tokenizer is trained on the training texts: pass texts=")
    return train_wordpiece(texts, cfg.vocab_size, cfg.max_length)
