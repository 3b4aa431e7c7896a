"""ALIGN's per-pair rules, vectorised over Arrow batches (paper defaults, all configurable).

* image: shorter side **> 200 px** and aspect ratio **< 3**, on the original dimensions;
* alt-text: **3..20 unigrams** after normalisation (:func:`unigrams`).

The global rules (texts per image, images per text, rare tokens, exact duplicates, eval-set
near-duplicates) need corpus-wide counts; they build on :func:`unigrams` / :func:`ngrams` here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from align_ray.data.hashing import normalize_text

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class PairRules:
    min_side: int = 200          # keep if shorter side > min_side
    max_aspect: float = 3.0      # keep if long/short < max_aspect
    min_tokens: int = 3          # keep if min_tokens <= unigrams <= max_tokens
    max_tokens: int = 20


def unigrams(text: str | None) -> list[str]:
    """Word tokens of the normalised alt-text (NFKC, case-folded; punctuation splits words)."""
    return _WORD.findall(normalize_text(text))


def ngrams(text: str | None) -> list[str]:
    """Unigrams and bigrams (joined by one space): the units of ALIGN's rare-token vocabulary."""
    words = unigrams(text)
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def pair_reasons(batch: pa.Table, rules: PairRules) -> list[str | None]:
    """Per row: None if the pair passes the per-pair rules, else the first rule it breaks."""
    w = np.asarray(batch.column("original_width").to_numpy(zero_copy_only=False), np.float64)
    h = np.asarray(batch.column("original_height").to_numpy(zero_copy_only=False), np.float64)
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    n_tok = np.array([len(unigrams(t)) for t in batch.column("text").to_pylist()])
    checks = [
        ("image_too_small", short <= rules.min_side),
        ("aspect_ratio", long_ >= rules.max_aspect * short),
        ("too_few_tokens", n_tok < rules.min_tokens),
        ("too_many_tokens", n_tok > rules.max_tokens),
    ]
    out: list[str | None] = [None] * batch.num_rows
    for reason, bad in reversed(checks):  # the first rule in `checks` wins
        for i in np.flatnonzero(bad):
            out[i] = reason
    return out
