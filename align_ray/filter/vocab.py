"""ALIGN's rare-token rule: a vocabulary of the top-K unigrams + bigrams of the raw corpus.

Plan (all distributed, pre-aggregated per block):

1. ``gram_counts``: explode every alt-text into unigrams and bigrams (:func:`rules.grams`),
   count inside each block, hash-shuffle and sum -> (gram, n).
2. ``cut``: the histogram of those counts (how many grams were seen n times) is tiny (a few
   thousand distinct n even at web scale), so it comes to the driver; the cut is the smallest
   count c such that at most K grams have n >= c, and never below ``min_token_count``.
3. ``text_rarity``: per *distinct text* (not per row), join its grams with the rare grams
   (n < cut) and keep, per text, the rarest count and one rare gram for the report.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from align_ray.filter.rules import grams, tokens
from align_ray.filter.shuffle import Agg, aggregate, join


def _grams_in_block(batch: pa.Table) -> pa.Table:
    _, g = grams(batch.column("text"))
    if len(g) == 0:
        return pa.table({"gram": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
    out = pa.table({"gram": g}).group_by("gram", use_threads=False).aggregate(
        [("gram", "count")])
    return out.rename_columns(["gram", "n"])


def gram_counts(texts: ray.data.Dataset, num_partitions: int) -> ray.data.Dataset:
    """(gram, n) over the raw corpus; ``texts`` has a ``text`` column (one row per pair row)."""
    partial = texts.map_batches(_grams_in_block, batch_format="pyarrow", batch_size=None)
    return aggregate(partial, ["gram"], [Agg("n", "sum", "n")], num_partitions)


def _hist_in_block(batch: pa.Table) -> pa.Table:
    out = batch.group_by("n", use_threads=False).aggregate([("n", "count")])
    return out.rename_columns(["n", "grams"])


def count_histogram(counts: ray.data.Dataset) -> dict[int, int]:
    """{n: number of grams seen exactly n times} (small: one entry per distinct count)."""
    partial = counts.map_batches(_hist_in_block, batch_format="pyarrow", batch_size=None)
    hist: dict[int, int] = {}
    for b in partial.iter_batches(batch_format="pyarrow", batch_size=None):
        for n, g in zip(b.column("n").to_pylist(), b.column("grams").to_pylist()):
            hist[n] = hist.get(n, 0) + g
    return hist


def cut(hist: dict[int, int], vocab_size: int, min_count: int) -> int:
    """Smallest count c with #grams(n >= c) <= vocab_size, and c >= min_count.

    Grams tied at the boundary are all left out (never broken arbitrarily), so the
    vocabulary can be a little smaller than K but never larger."""
    floor, inside, last = max(1, min_count), 0, None
    for n in sorted(hist, reverse=True):
        if inside + hist[n] > vocab_size:
            return max(floor, last if last is not None else n + 1)
        inside += hist[n]
        last = n
    return floor


def _text_grams_in_block(batch: pa.Table, bigrams: bool) -> pa.Table:
    texts = batch.select(["text_hash", "text"]).group_by(
        "text_hash", use_threads=False).aggregate([("text", "min")])
    if bigrams:
        parent, g = grams(texts.column("text_min"))
    else:
        parent, g = tokens(texts.column("text_min"))
    th = pc.take(texts.column("text_hash"), pa.array(parent, pa.int64()))
    pairs = pa.table({"text_hash": th, "gram": g})
    return pairs.group_by(["text_hash", "gram"], use_threads=False).aggregate([])


def text_rarity(rows: ray.data.Dataset, counts: ray.data.Dataset, cut_at: int,
                num_partitions: int, bigrams: bool = False) -> ray.data.Dataset:
    """(text_hash, gram_n, rare_gram) for every text holding a gram seen fewer than ``cut_at``
    times (``gram_n``: the smallest such count; ``rare_gram``: one of those grams)."""
    text_grams = rows.map_batches(_text_grams_in_block, fn_kwargs={"bigrams": bigrams},
                                  batch_format="pyarrow", batch_size=None)
    hits = join(text_grams, counts, ["gram"], "inner", num_partitions,
                right_where=pc.field("n") < cut_at)
    return aggregate(hits, ["text_hash"], [Agg("gram_n", "min", "n"),
                                           Agg("rare_gram", "min", "gram")], num_partitions)


def vocabulary_size(hist: dict[int, int], cut_at: int) -> int:
    return int(sum(g for n, g in hist.items() if n >= cut_at))


