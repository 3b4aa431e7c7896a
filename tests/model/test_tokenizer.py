"""Trained WordPiece: real tokens (not all [UNK]), round trip through save/from_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from align_ray.model import build_tokenizer, load_tokenizer, tokenize, train_wordpiece
from tests.conftest import DEV_SET as DEV
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


def test_same_captions_give_the_same_vocabulary_in_every_process():
    """Hash maps are seeded per process, so only separate processes show the trainer's
    tie-breaking drift (huggingface/tokenizers#1794). Without the fix, three runs on these
    captions gave three vocabularies; two runs must now agree id for id."""
    if not DEV.exists():
        pytest.skip(f"{DEV} not present")
    script = (
        "import json, sys, pyarrow.parquet as pq\n"
        "from align_ray.model.tokenizer import train_wordpiece\n"
        "texts = pq.read_table(sys.argv[1], columns=['alt_text']).column('alt_text').to_pylist()\n"
        "print(json.dumps(sorted(train_wordpiece(texts).get_vocab().items(), key=lambda kv: kv[1])))\n"
    )
    vocabs = [subprocess.run([sys.executable, "-c", script, str(DEV)], capture_output=True, text=True,
                             check=True, timeout=120).stdout for _ in range(2)]
    assert len(json.loads(vocabs[0])) > 1000
    assert vocabs[1] == vocabs[0]


def _bert_fast():
    """A BERT WordPiece fast tokenizer as a pretrained text tower (MiniLM, ...) saves it."""
    from transformers import BertTokenizerFast

    words = "grinning face with smiling eyes red heart cat dog flag of the a".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##ing"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


@pytest.mark.parametrize("which", ["trained", "bert"])
def test_caption_encoder_gives_what_transformers_gives(which, tokenizer, dev_rows):
    """The training ingest's workers encode captions with ``tokenizers`` alone
    (``CaptionEncoder``): ids and masks equal the transformers tokenizer's, padded and
    truncated to max_length, on real captions, empty ones, odd Unicode and long ones; and the
    module that runs it imports no transformers."""
    from align_ray.model.tokenizer import CaptionEncoder
    from align_ray.train.preprocess import caption_encoder, tokenizer_files

    tok = tokenizer if which == "trained" else _bert_fast()
    files = tokenizer_files(tok)
    texts = dev_rows["text"][:200] + ["", "Ünïcode naïve café 🙂", "GRINNING   Face\twith\n eyes",
                                      " ".join(dev_rows["text"][:40])]
    for L in (8, 64):
        enc = caption_encoder(files, L)
        assert isinstance(enc, CaptionEncoder)
        ids, mask = enc(texts)
        want = tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="np",
                   return_token_type_ids=False)
        assert ids.shape == mask.shape == (len(texts), L) and ids.dtype == mask.dtype == "int64"
        assert (ids == want["input_ids"]).all() and (mask == want["attention_mask"]).all()
        assert mask[-1].all() and not mask[len(texts) - 4].all()   # truncated / padded rows
    # no tokenizer.json (a slow-only tokenizer): transformers does it
    slow = {k: v for k, v in files.items() if k != "tokenizer.json"}
    assert CaptionEncoder.from_files(slow, 8) is None
    code = ("import sys; import align_ray.train.preprocess; "
            "print(sorted(m for m in ('transformers', 'torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
