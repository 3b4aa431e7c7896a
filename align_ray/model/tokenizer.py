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
