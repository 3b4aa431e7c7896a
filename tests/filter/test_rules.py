"""ALIGN's per-pair rules at their boundaries (answers computed by hand)."""

from __future__ import annotations

import pyarrow as pa

from align_ray.filter.rules import PairRules, ngrams, pair_reasons, unigrams

WORDS3 = "one two three"


def table(rows):
    return pa.table({"original_width": [r[0] for r in rows], "original_height": [r[1] for r in rows],
                     "text": [r[2] for r in rows]})


def test_shorter_side_must_exceed_200():
    got = pair_reasons(table([(300, 199, WORDS3), (300, 200, WORDS3), (300, 201, WORDS3),
                              (201, 500, WORDS3)]), PairRules())
    assert got == ["image_too_small", "image_too_small", None, None]


def test_aspect_ratio_must_be_below_3():
    got = pair_reasons(table([(299, 100 + 1, WORDS3), (897, 300, WORDS3), (900, 300, WORDS3),
                              (300, 900, WORDS3), (301 * 3, 301, WORDS3)]),
                       PairRules(min_side=50))
    # 299/101=2.96 keep; 897/300=2.99 keep; 3.0 drop (both orientations); 3.0 drop
    assert got == [None, None, "aspect_ratio", "aspect_ratio", "aspect_ratio"]


def test_token_count_3_to_20():
    texts = [" ".join(f"w{i}" for i in range(n)) for n in (2, 3, 20, 21)]
    got = pair_reasons(table([(400, 300, t) for t in texts]), PairRules())
    assert got == ["too_few_tokens", None, None, "too_many_tokens"]
    assert pair_reasons(table([(400, 300, None)]), PairRules()) == ["too_few_tokens"]


def test_first_broken_rule_is_reported():
    assert pair_reasons(table([(100, 100, "x")]), PairRules()) == ["image_too_small"]


def test_tokenisation_normalises():
    assert unigrams("  Red\u00a0CIRCLE, on-a BLUE  background! ") == [
        "red", "circle", "on", "a", "blue", "background"]
    assert unigrams("IMG_2043.jpg") == ["img_2043", "jpg"]
    assert ngrams("a b c") == ["a", "b", "c", "a b", "b c"]
    assert unigrams("日本 の 写真") == ["日本", "の", "写真"]
