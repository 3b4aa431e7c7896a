"""Trained WordPiece: real tokens (not all [UNK]), round trip through save/from_pretrained."""

from __future__ import annotations

from transformers import AutoTokenizer

from align_ray.model import build_tokenizer, load_tokenizer, tokenize, train_wordpiece
from tests.model.helpers import tiny_cfg


def test_trained_wordpiece_is_not_all_unk(tokenizer, dev_rows):
    unk = tokenizer.unk_token_id
    enc = tokenizer(dev_rows["text"][:20])["input_ids"]
    for ids in enc:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        body = ids[1:-1]
        assert body and sum(i == unk for i in body) == 0
    toks = tokenizer.convert_ids_to_tokens(tokenizer("Grinning FACE with smiling eyes")["input_ids"])
    assert toks == ["[CLS]", "grinning", "face", "with", "smiling", "eyes", "[SEP]"]  # lower-cased
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tokenizer.model_max_length == 64
    # unseen words are split into known pieces rather than dropped wholesale
    assert tokenizer("facing smiles")["input_ids"].count(unk) == 0


def test_round_trip_save_from_pretrained(tokenizer, dev_rows, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(tmp_path)):
        assert len(loaded) == len(tokenizer)
        texts = dev_rows["text"][:16] + ["", "Ünïcode naïve café 🙂"]
        assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
        assert loaded.pad_token_id == 0 and loaded.cls_token_id == 2


def test_tokenize_pads_truncates_and_vocab_is_capped():
    tok = train_wordpiece(["one two three four five six seven eight nine ten"] * 3, vocab_size=1000)
    assert len(tok) < 1000  # capped by the corpus
    enc = tokenize(tok, ["one two three four five six seven eight nine ten", "two", None], max_length=6)
    assert enc["input_ids"].shape == (3, 6)
    assert enc["input_ids"][0, -1].item() == tok.sep_token_id  # truncated, still ends with [SEP]
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert enc["input_ids"][2, :2].tolist() == [tok.cls_token_id, tok.sep_token_id]  # None -> ""


def test_build_tokenizer_trains_when_nothing_given(dev_rows):
    tok = build_tokenizer(tiny_cfg(vocab_size=300), dev_rows["text"])
    assert 100 < len(tok) <= 300
