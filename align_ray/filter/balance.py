"""MetaCLIP-style balancing (``balance_entries``, rule ``metaclip_balance``; Xu et al. 2023).

The metadata is a text file of concepts, one per line.  A caption *matches* an entry when the
entry's words appear in it as consecutive words, after the same normalisation the other text
rules use (NFKC, lower case, split on non-word characters): "cat" matches "a cat on a mat" but
not "category" (MetaCLIP matches substrings; whole words are our choice, so that short entries
do not match inside longer words).

Each entry's count is taken over the raw corpus, like every other global count of the filter.
A pair is kept when one of its entries *selects* it: an entry with at most ``balance_cap``
pairs selects all of them (the tail is kept whole), one with ``count`` > cap selects each of its
pairs with probability cap / count, so about ``cap`` of them survive (the head is flattened).
A pair that matches no entry is dropped, as in MetaCLIP's curation.  The draws are a hash of
(key, entry, ``balance_seed``), not a random generator, so a rerun, or the same corpus split
into other blocks, keeps the same rows.

Two passes over the filter's per-row table: per-block entry counts summed on the driver (one
int64 per entry), then each row's verdict, computed before the plan's join so that only a bool
and a detail string travel through it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from align_ray import storage
from align_ray.data.errors import InputError
from align_ray.filter.rules import tokens

RULE = "metaclip_balance"


def load_entries(location: str) -> pa.Array:
    """The entries of the file at ``location`` (local or s3://), normalised as captions are;
    blank lines and lines starting with '#' are skipped, repeats kept once."""
    try:
        lines = storage.read_text(location).splitlines()
    except FileNotFoundError:
        raise InputError(f"balance_entries: {location} does not exist") from None
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    parent, toks = tokens(pa.array(lines, pa.string()))
    words: list[list[str]] = [[] for _ in lines]
    for row, tok in zip(parent.tolist(), toks.to_pylist()):
        words[row].append(tok)
    entries = list(dict.fromkeys(" ".join(w) for w in words if w))
    if not entries:
        raise InputError(f"balance_entries: {location} has no entries")
    return pa.array(entries, pa.string())


def _max_words(entries: pa.Array) -> int:
    return int(pc.max(pc.add(pc.count_substring(entries, " "), 1)).as_py())


def matches(texts: pa.Array | pa.ChunkedArray, entries: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(row, entry id) of every caption-entry match, each pair once, sorted by row."""
    parent, toks = tokens(texts)
    rows, grams = [parent], [toks]
    for n in range(2, _max_words(entries) + 1):
        if len(toks) < n:
            break
        start = np.flatnonzero(parent[n - 1:] == parent[:len(parent) - n + 1])  # same caption
        g = toks.take(pa.array(start))
        for j in range(1, n):
            g = pc.binary_join_element_wise(g, toks.take(pa.array(start + j)), " ")
        rows.append(parent[start])
        grams.append(g)
    ids = np.asarray(pc.index_in(pa.concat_arrays(grams), value_set=entries).fill_null(-1)
                     .to_numpy(zero_copy_only=False), np.int64)
    row = np.concatenate(rows)
    hit = ids >= 0
    pair = np.unique(row[hit] * len(entries) + ids[hit])
    return pair // len(entries), pair % len(entries)


def _count_block(batch: pa.Table, entries: pa.Array) -> pa.Table:
    _, ids = matches(batch.column("text"), entries)
    entry, n = np.unique(ids, return_counts=True)
    return pa.table({"entry": entry.astype(np.int64), "n": n.astype(np.int64)})


def entry_counts(m: ray.data.Dataset, entries: pa.Array) -> np.ndarray:
    """Pairs per entry over every row of ``m`` (a ``text`` column)."""
    total = np.zeros(len(entries), np.int64)
    parts = m.select_columns(["text"]).map_batches(
        _count_block, fn_kwargs={"entries": entries}, batch_format="pyarrow", batch_size=None)
    for b in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        np.add.at(total, b.column("entry").to_numpy(), b.column("n").to_numpy())
    return total


def uniform(key: np.ndarray, entry: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic draw in [0, 1) per (key, entry): splitmix64 of the pair."""
    with np.errstate(over="ignore"):
        z = (np.asarray(key, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.asarray(entry, np.uint64) * np.uint64(0xD1B54A32D192ED03) + np.uint64(seed))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def mark(batch: pa.Table, entries: pa.Array, counts: np.ndarray, cap: int,
         seed: int) -> pa.Table:
    """``batch`` plus ``bal_bad`` (not selected by any of its entries) and ``bal_detail``."""
    n = batch.num_rows
    row, ids = matches(batch.column("text"), entries)
    key = np.asarray(batch.column("key_id").to_numpy(zero_copy_only=False), np.int64)
    c = counts[ids]
    picked = (c <= cap) | (uniform(key[row], ids, seed) < cap / np.maximum(c, 1))
    kept = np.zeros(n, bool)
    kept[row[picked]] = True
    over: dict[int, list[str]] = {}
    names = entries.to_pylist() if not kept[row].all() else []
    for r, e in zip(row.tolist(), ids.tolist()):
        if not kept[r]:
            over.setdefault(r, []).append(f"{names[e]!r} ({counts[e]} pairs)")
    detail: list[str | None] = [None] * n
    for i in np.flatnonzero(~kept).tolist():
        detail[i] = (f"entries {', '.join(over[i])} over the cap {cap}: not sampled"
                     if i in over else "matches no metadata entry")
    return batch.append_column("bal_bad", pa.array(~kept)).append_column(
        "bal_detail", pa.array(detail, pa.string()))


def summary(entries: pa.Array, counts: np.ndarray, cap: int) -> dict:
    return {"entries": len(entries), "entries_matched": int((counts > 0).sum()),
            "entries_over_cap": int((counts > cap).sum()), "cap": cap,
            "largest": [{"entry": entries[int(i)].as_py(), "pairs": int(counts[i])}
                        for i in np.argsort(-counts, kind="stable")[:5] if counts[i] > 0]}
