"""Tokenizers: a pretrained HF tokenizer, or a WordPiece vocabulary trained on the training texts.

The trained tokenizer is built with ``tokenizers`` (BERT normaliser with lower-casing, BERT
pre-tokenizer, ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``[CLS] ... [SEP]`` template) and wrapped with
``PreTrainedTokenizerFast(tokenizer_object=...)``. Never ``vocab_file=``: transformers 5 silently
ignores it and every token becomes ``[UNK]`` (env pitfall 13).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from align_ray.model.config import ModelConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if isinstance(t, str) and t:
            yield t


def _continuing_pieces(texts: Iterable[str], normalizer, pre_tokenizer) -> list[str]:
    """Every ``##c`` that WordPiece training will create: each character after the first of a word."""
    chars: set[str] = set()
    for t in _strings(texts):
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)):
            chars.update(word[1:])
    return ["##" + c for c in sorted(chars)]


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 8000, max_length: int = 64, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a lower-cased BERT-style WordPiece tokenizer on ``texts`` (vocab capped by the corpus).

    The same texts give the same vocabulary in every process. ``tokenizers``' trainer alone does
    not: it numbers the ``##c`` pieces in hash-map order, and those numbers break ties between
    equally frequent merges, so two runs learn different subwords (huggingface/tokenizers#1794).
    Handing it every ``##c`` up front, in sorted order, fixes their numbers; they are then made
    ordinary vocabulary entries again. ``texts`` is read twice (an iterator is listed first)."""
    if iter(texts) is texts:
        texts = list(texts)
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    pieces = _continuing_pieces(texts, normalizer, pre_tokenizer)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS + pieces, continuing_subword_prefix="##",
    )
    draft = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    draft.normalizer, draft.pre_tokenizer = normalizer, pre_tokenizer
    draft.train_from_iterator(_strings(texts), trainer=trainer)
    # the same vocabulary with only the real special tokens: the seeded pieces must stay plain
    # subwords (a special token is matched in raw text and skipped when decoding)
    tok = Tokenizer(models.WordPiece(vocab=draft.get_vocab(with_added_tokens=False), unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=max_length,
    )


def load_tokenizer(name_or_dir: str, max_length: int | None = None) -> PreTrainedTokenizerBase:
    """A saved or hub tokenizer (``AutoTokenizer``; fast when available)."""
    from transformers import AutoTokenizer

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


class CaptionEncoder:
    """``tokenizer(texts, padding="max_length", truncation=True, max_length=L)`` of a saved
    fast tokenizer, run by the ``tokenizers`` library alone from its ``tokenizer.json``: the
    ``input_ids`` and ``attention_mask`` transformers gives (tests/model/test_tokenizer.py), for
    the training ingest's Ray Data workers, which then never import transformers (nor the torch
    and timm that transformers imports on start): seconds of CPU per worker process."""

    def __init__(self, tokenizer_json: str, max_length: int, pad_token: str) -> None:
        self.tok = Tokenizer.from_str(tokenizer_json)
        pad_id = self.tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_files(cls, files: dict[str, bytes], max_length: int) -> "CaptionEncoder | None":
        """From ``save_pretrained``'s files; None where only transformers can reproduce the
        tokenizer: no ``tokenizer.json`` (a slow-only tokenizer), no pad token, left padding
        or truncation, or tokens added outside ``tokenizer.json``."""
        if "tokenizer.json" not in files or "tokenizer_config.json" not in files:
            return None
        conf = json.loads(files["tokenizer_config.json"])
        pad = conf.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if not isinstance(pad, str) or "added_tokens.json" in files \
                or conf.get("padding_side", "right") != "right" \
                or conf.get("truncation_side", "right") != "right":
            return None
        return cls(files["tokenizer.json"].decode(), max_length, pad)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encs = self.tok.encode_batch(texts)
        return (np.asarray([e.ids for e in encs], dtype=np.int64),
                np.asarray([e.attention_mask for e in encs], dtype=np.int64))
