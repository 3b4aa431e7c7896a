"""The global filter plan: metadata rows -> one verdict per row (None = keep, else the rule).

Only metadata moves (keys, 64-bit hashes, sizes, the alt-text); image bytes stay where they
are until the per-shard writer.  Steps (aggregates are pre-aggregated per block before their
shuffle; every shuffle is a task-based hash partition, :mod:`align_ray.filter.shuffle`):

    M  = rows + per-row facts (pair rule, token count, eval-set distance)   [map, materialised]
    P  = distinct (image, text) pairs: rows, smallest key                    [aggregate]
    I  = per image: distinct texts;  T = per text: distinct images          [aggregate x2]
    G  = gram counts -> histogram -> cut -> per-text rarest gram   [aggregate, join, aggregate]
    P' = P + I + T                                                           [join x2 (+1 for T+G)]
    V  = M + P' -> reason                                                    [join]

Rules are applied in this order, the first broken one is the row's reason: the per-pair rules,
eval-set near-duplicates, texts per image, images per text, rare tokens, exact duplicates,
near-duplicate images (:mod:`align_ray.filter.neardup`, joined into P' per image), MetaCLIP
balancing, then the score rules (``score_min``, ``score_keep_fraction``: its exact global cut
is found on M before V, :mod:`align_ray.filter.quantile`).  The frequency rules are functions of (image,
text), so exact duplicates always share their verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from align_ray.filter import counts as counts_lib
from align_ray.filter import balance, neardup, quantile, vocab
from align_ray.filter.config import FilterConfig
from align_ray.filter.evalset import min_distance
from align_ray.filter.rules import PairRules, pair_reasons, token_counts
from align_ray.filter.shuffle import join

META_COLS = ["key", "text", "sha256", "phash", "text_hash", "original_width", "original_height"]
SCORE_COL = "pair_score"


def meta_cols(cfg: FilterConfig) -> list[str]:
    return META_COLS + ([SCORE_COL] if cfg.needs_score() else [])


def _img_id(batch: pa.Table, identity: str) -> pa.Array:
    if identity == "phash":
        return batch.column("phash").combine_chunks().cast(pa.uint64())
    sha = batch.column("sha256").to_pylist()
    raw = bytes.fromhex("".join(s[:16] if s else "0" * 16 for s in sha))
    return pa.array(np.frombuffer(raw, dtype=">u8").astype(np.uint64))


def _pair_detail(reason: str, w: int, h: int, n_tok: int, cfg: FilterConfig) -> str:
    if reason == "image_too_small":
        return f"original {w}x{h}: shorter side must be > {cfg.min_side} px"
    if reason == "aspect_ratio":
        aspect = max(w, h) / max(1, min(w, h))
        return f"original {w}x{h}: aspect {aspect:.2f} must be < {cfg.max_aspect}"
    return f"{n_tok} unigrams, must be {cfg.min_tokens}..{cfg.max_tokens}"


def prepare(batch: pa.Table, cfg: FilterConfig, eval_hashes: np.ndarray) -> pa.Table:
    """Per-row facts that need no global counts."""
    n_tok = token_counts(batch.column("text"))
    rules = PairRules(cfg.min_side, cfg.max_aspect, cfg.min_tokens, cfg.max_tokens)
    reasons = [r if r and cfg.enabled(r) else None for r in pair_reasons(batch, rules, n_tok)]
    w = np.asarray(batch.column("original_width").to_numpy(zero_copy_only=False), np.int32)
    h = np.asarray(batch.column("original_height").to_numpy(zero_copy_only=False), np.int32)
    details = [None if r is None else _pair_detail(r, w[i], h[i], n_tok[i], cfg)
               for i, r in enumerate(reasons)]
    ph = np.asarray(batch.column("phash").to_numpy(zero_copy_only=False), np.uint64)
    key = batch.column("key")
    key_id = key if pa.types.is_integer(key.type) else pc.cast(key, pa.int64())
    score = ({SCORE_COL: batch.column(SCORE_COL).cast(pa.float32())}
             if SCORE_COL in batch.column_names else {})
    # the pHash stays in the materialised rows only for the near-duplicate search
    near = {"phash": pa.array(ph, pa.uint64())} if cfg.enabled(neardup.RULE) else {}
    return pa.table({**score, **near,
        "key_id": key_id.cast(pa.int64()), "shard": batch.column("shard"),
        "img_id": _img_id(batch, cfg.image_identity),
        "text_hash": batch.column("text_hash").cast(pa.uint64()), "text": batch.column("text"),
        "pair_reason": pa.array(reasons, pa.string()),
        "pair_detail": pa.array(details, pa.string()),
        "eval_dist": min_distance(ph, eval_hashes), "n_tok": n_tok,
        "min_side": np.minimum(w, h),
    })


def _score_checks(batch: pa.Table, cfg: FilterConfig, cut: quantile.Cut | None) -> list:
    if not cfg.needs_score():
        return []
    score = np.asarray(batch.column(SCORE_COL).to_numpy(zero_copy_only=False), np.float32)
    key_id = np.asarray(batch.column("key_id").to_numpy(zero_copy_only=False), np.int64)
    out = []
    if cfg.enabled("score_min"):
        out.append(("score_min", ~(score >= np.float32(cfg.score_min)),  # NaN/missing: dropped
                    lambda i: f"pair_score {score[i]:.4f} < score_min {cfg.score_min}"))
    if cfg.enabled("score_keep_fraction") and cut is not None:
        out.append(("score_keep_fraction", ~cut.keeps(score, key_id),
                    lambda i: f"pair_score {score[i]:.4f} not in the top "
                              f"{cfg.score_keep_fraction} ({cut.keep} of {cut.rows} rows, "
                              f"cut at {cut.score if cut.score is not None else 'none'})"))
    return out


def _near_dup_check(batch: pa.Table, cfg: FilterConfig, col) -> list:
    if not cfg.enabled(neardup.RULE):
        return []
    near, cands = col("nd_first", -1), col(neardup.CANDIDATES)
    return [(neardup.RULE, near >= 0,
             lambda i: f"pHash within {cfg.near_dup_distance} bits of the image of key "
                       f"{near[i]:014d} ({cands[i]} candidates compared)")]


def _balance_check(batch: pa.Table, cfg: FilterConfig) -> list:
    if not cfg.enabled(balance.RULE):
        return []
    bad = np.asarray(batch.column("bal_bad").to_numpy(zero_copy_only=False), bool)
    detail = batch.column("bal_detail").to_pylist()
    return [(balance.RULE, bad, lambda i: detail[i])]


def decide(batch: pa.Table, cfg: FilterConfig, cut_at: int,
           score_cut: quantile.Cut | None = None) -> pa.Table:
    """Turn the joined facts of each row into (reason, detail)."""
    n = batch.num_rows
    reason: list[str | None] = batch.column("pair_reason").to_pylist()
    detail: list[str | None] = (batch.column("pair_detail").to_pylist()
                                if "pair_detail" in batch.column_names else [None] * n)

    def col(name, default=0):
        c = batch.column(name)
        if pa.types.is_null(c.type):
            return np.full(n, default)
        return np.asarray(c.fill_null(default).to_numpy(zero_copy_only=False))

    eval_dist, n_texts, n_images = col("eval_dist", 64), col("n_texts"), col("n_images")
    gram_n = col("gram_n", -1) if "gram_n" in batch.column_names else np.full(n, -1)
    rare = batch.column("rare_gram").to_pylist() if "rare_gram" in batch.column_names else None
    key_id, first = col("key_id"), col("first_key")
    checks = [
        ("eval_near_duplicate", eval_dist <= cfg.eval_max_distance,
         lambda i: f"pHash within {eval_dist[i]} bits of an eval image"),
        ("image_too_many_texts", n_texts > cfg.max_texts_per_image,
         lambda i: f"image has {n_texts[i]} distinct alt-texts (max {cfg.max_texts_per_image})"),
        ("text_too_many_images", n_images > cfg.max_images_per_text,
         lambda i: f"alt-text on {n_images[i]} distinct images (max {cfg.max_images_per_text})"),
        ("rare_token", gram_n >= 0,
         lambda i: f"{rare[i]!r} seen {gram_n[i]}x in the corpus (vocabulary needs >= {cut_at})"),
        ("exact_duplicate", (key_id != first) if cfg.dedup else np.zeros(n, bool),
         lambda i: f"same image and text as key {first[i]:014d}"),
    ] + _near_dup_check(batch, cfg, col) + _balance_check(batch, cfg) + _score_checks(batch, cfg, score_cut)
    for name, bad, explain in checks:
        if not cfg.enabled(name):
            continue
        for i in np.flatnonzero(bad):
            if reason[i] is None:
                reason[i], detail[i] = name, explain(i)
    out = pa.table({"key_id": batch.column("key_id"), "shard": batch.column("shard"),
                    "text_hash": batch.column("text_hash"), "img_id": batch.column("img_id"),
                    "reason": pa.array(reason, pa.string()),
                    "detail": pa.array(detail, pa.string())})
    if cfg.enabled(neardup.RULE):   # the band search's cost, on every row (kept rows too)
        out = out.append_column(neardup.CANDIDATES, pa.array(col(neardup.CANDIDATES), pa.int64()))
    return out


@dataclass
class Plan:
    rows: ray.data.Dataset               # M (materialised)
    pairs: ray.data.Dataset              # P (materialised)
    images: ray.data.Dataset             # I: img_id, n_texts, image_rows
    texts: ray.data.Dataset              # T: text_hash, n_images, text_rows[, gram_n, rare_gram]
    verdicts: ray.data.Dataset           # V: key_id, shard, text_hash, img_id, reason, detail
    vocab: dict = field(default_factory=dict)
    score_cut: quantile.Cut | None = None   # the score_keep_fraction cut, when that rule is on
    balance: dict | None = None          # entry counts summary, when metaclip_balance is on
    near_dup: dict | None = None         # the band search's summary, when near_duplicate is on


def build(rows: ray.data.Dataset, cfg: FilterConfig, eval_hashes: np.ndarray,
          num_partitions: int) -> Plan:
    """Lazily build V (the verdict of every row) from metadata rows (see module docstring)."""
    npart = num_partitions
    m = rows.map_batches(prepare, fn_kwargs={"cfg": cfg, "eval_hashes": eval_hashes},
                         batch_format="pyarrow", batch_size=None).materialize()
    pairs = counts_lib.pair_table(m, "img_id", "text_hash", npart, key="key_id")
    images = counts_lib.per_key(pairs, "img_id", npart, "n_texts", "image_rows")  # + the report
    texts = counts_lib.per_key(pairs, "text_hash", npart, "n_images", "text_rows")
    info: dict = {}
    cut_at = 0
    if cfg.enabled("rare_token"):
        grams = vocab.gram_counts(m, npart)
        hist = vocab.count_histogram(grams)
        cut_at = vocab.cut(hist, cfg.vocab_size, cfg.min_token_count)
        info = {"distinct_grams": int(sum(hist.values())), "cut": cut_at,
                "vocabulary_size": vocab.vocabulary_size(hist, cut_at)}
        rarity = vocab.text_rarity(m, grams, cut_at, npart, bigrams=cfg.check_bigrams)
        texts = join(texts, rarity, ["text_hash"], "left outer", npart)
    facts = join(join(pairs, images, ["img_id"], "inner", npart), texts, ["text_hash"], "inner",
                 npart, drop=["rows", "image_rows", "text_rows"])
    near_dup = None
    if cfg.enabled(neardup.RULE):
        found = neardup.matches(m, cfg.near_dup_distance, npart)
        near_dup = neardup.summary(found, cfg.near_dup_distance)
        facts = join(facts, found, ["img_id"], "left outer", npart)
    score_cut = None
    if cfg.enabled("score_keep_fraction"):
        n = m.count()   # the raw corpus, like every other global count here
        score_cut = quantile.top_k_cut(m, keep_count(cfg.score_keep_fraction, n), n,
                                       SCORE_COL, "key_id")
    per_row = ["key_id", "shard", "img_id", "text_hash", "pair_reason", "pair_detail", "eval_dist"]
    per_row += [SCORE_COL] if cfg.needs_score() else []
    left, balanced = m, None
    if cfg.enabled(balance.RULE):
        entries = balance.load_entries(cfg.balance_entries)
        counts = balance.entry_counts(m, entries)
        balanced = balance.summary(entries, counts, cfg.balance_cap)
        left = m.map_batches(balance.mark, fn_kwargs={
            "entries": entries, "counts": counts, "cap": cfg.balance_cap,
            "seed": cfg.balance_seed}, batch_format="pyarrow", batch_size=None)
        per_row += ["bal_bad", "bal_detail"]
    verdicts = join(left, facts, ["img_id", "text_hash"], "inner", npart,
                    left_columns=per_row).map_batches(
        decide, fn_kwargs={"cfg": cfg, "cut_at": cut_at, "score_cut": score_cut},
        batch_format="pyarrow", batch_size=None)
    return Plan(rows=m, pairs=pairs, images=images, texts=texts, verdicts=verdicts, vocab=info,
                score_cut=score_cut, balance=balanced, near_dup=near_dup)


def keep_count(fraction: float, rows: int) -> int:
    """ceil(fraction x rows), less a hair so that 0.3 x 10 (3.0000000000000004) keeps 3."""
    return min(rows, max(0, math.ceil(fraction * rows - 1e-9)))
