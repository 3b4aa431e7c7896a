"""ALIGN's per-pair rules and its alt-text tokenisation, vectorised over Arrow columns.

* image: shorter side **> 200 px** and aspect ratio **< 3**, on the original dimensions;
* alt-text: **3..20 unigrams** after normalisation (:func:`tokens`).

Tokenisation (shared by the token-count rule and the rare-token vocabulary, so the two always
agree): NFKC, lower-cased, split on every run of characters that are not letters, digits or
``_`` (``[^\\pL\\pN_]+``); empty pieces are discarded.  The vocabulary units are these unigrams
plus bigrams of consecutive unigrams joined by one space (:func:`grams`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SPLIT = r"[^\pL\pN_]+"


@dataclass
class PairRules:
    min_side: int = 200          # keep if shorter side > min_side
    max_aspect: float = 3.0      # keep if long/short < max_aspect
    min_tokens: int = 3          # keep if min_tokens <= unigrams <= max_tokens
    max_tokens: int = 20


def tokens(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Flattened unigrams of every text: (row index of each token, token strings)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    norm = pc.utf8_lower(pc.utf8_normalize(texts.cast(pa.string()), "NFKC"))
    pieces = pc.split_pattern_regex(norm, _SPLIT)
    parent = pc.list_parent_indices(pieces)
    flat = pc.list_flatten(pieces)
    keep = pc.greater(pc.utf8_length(flat), 0)
    return (np.asarray(pc.filter(parent, keep).to_numpy(zero_copy_only=False), np.int64),
            pc.filter(flat, keep))


def token_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    parent, _ = tokens(texts)
    return np.bincount(parent, minlength=len(texts)).astype(np.int32)


def grams(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Unigrams then bigrams of every text: (row index of each gram, gram strings)."""
    parent, toks = tokens(texts)
    if len(toks) < 2:
        return parent, toks
    same = parent[:-1] == parent[1:]
    bi = pc.binary_join_element_wise(toks.slice(0, len(toks) - 1), toks.slice(1), " ")
    mask = pa.array(same)
    return (np.concatenate([parent, parent[:-1][same]]),
            pa.concat_arrays([toks, pc.filter(bi, mask)]))


def unigrams(text: str | None) -> list[str]:
    """Unigrams of one alt-text (for tests and reports; the stage uses :func:`tokens`)."""
    return tokens(pa.array([text], pa.string()))[1].to_pylist()


def ngrams(text: str | None) -> list[str]:
    """Unigrams and bigrams of one alt-text: the units of ALIGN's rare-token vocabulary."""
    return grams(pa.array([text], pa.string()))[1].to_pylist()


PAIR_REASONS = ("image_too_small", "aspect_ratio", "too_few_tokens", "too_many_tokens")


def pair_reasons(batch: pa.Table, rules: PairRules,
                 n_tok: np.ndarray | None = None) -> list[str | None]:
    """Per row: None if the pair passes the per-pair rules, else the first rule it breaks."""
    w = np.asarray(batch.column("original_width").to_numpy(zero_copy_only=False), np.float64)
    h = np.asarray(batch.column("original_height").to_numpy(zero_copy_only=False), np.float64)
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    if n_tok is None:
        n_tok = token_counts(batch.column("text"))
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
