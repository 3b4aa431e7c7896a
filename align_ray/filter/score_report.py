"""The ``pair_score`` part of the filter report: the score histogram of every downloaded row
with the score rules' thresholds, and the lowest- and highest-scoring pairs with thumbnails.

Like the rest of the report it is built from small per-block partials (a 200-bin histogram and
each block's ``EXAMPLES`` lowest and highest rows); only the few example images are read back,
from the row groups of the shard files that hold them."""

from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from align_ray.filter.config import FilterConfig
from align_ray.filter.plan import SCORE_COL
from align_ray.layout import PARQUET, Layout

LO, WIDTH, BINS = -1.0, 0.01, 200   # cosine scores: [-1, 1] in steps of 0.01
EXAMPLES = 8                         # lowest and highest pairs shown


def _block(batch: pa.Table, k: int) -> pa.Table:
    s = np.asarray(batch.column(SCORE_COL).to_numpy(zero_copy_only=False), np.float64)
    ok = np.isfinite(s)
    counts = np.bincount(np.clip(((s[ok] - LO) / WIDTH).astype(int), 0, BINS - 1),
                         minlength=BINS)
    idx = np.flatnonzero(ok)
    # ties broken by key, so that each block's picks are exactly its ends in (score, key) order
    # and the merged picks the corpus's, whatever rows a block holds
    key = np.asarray(batch.column("key_id").to_numpy(zero_copy_only=False), np.int64)
    order = idx[np.lexsort((key[idx], s[idx]))]
    pick = np.unique(np.concatenate([order[:k], order[-k:]])) if len(order) else order
    ex = batch.take(pa.array(pick, pa.int64())).select(["key_id", "shard", "text", SCORE_COL])
    return pa.table({"counts": [counts.tolist()], "missing": [int((~ok).sum())],
                     "examples": [json.dumps(ex.to_pylist())]})


def thresholds(cfg: FilterConfig, cut) -> dict:
    """The score each enabled score rule cuts at (the keep-fraction's is the k-th best)."""
    out = {}
    if cfg.enabled("score_min"):
        out["score_min"] = cfg.score_min
    if cfg.enabled("score_keep_fraction") and cut is not None and cut.score is not None:
        out["score_keep_fraction"] = round(float(cut.score), 6)
    return out


def _images(src: Layout, shards: list[dict], picks: list[dict]) -> dict[int, tuple[str, bytes]]:
    """key_id -> (key, jpg) of the picked rows: per shard file, the key column, then only the
    row groups that hold a picked row."""
    want: dict[int, set[int]] = defaultdict(set)
    for p in picks:
        want[p["shard"]].add(p["key_id"])
    out: dict[int, tuple[str, bytes]] = {}
    for shard, ids in want.items():
        for part in shards[shard]["parts"]:
            if not part.startswith(f"{PARQUET}/"):
                continue
            with src.fs.open_input_file(src.path(part)) as f:
                pf = pq.ParquetFile(f)
                keys = pf.read(columns=["key"]).column("key")
                hit = pc.is_in(pc.cast(keys, pa.int64()), pa.array(sorted(ids), pa.int64()))
                rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                          for g in range(pf.num_row_groups)])
                for g in sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows}):
                    t = pf.read_row_group(g, columns=["key", "jpg"])
                    for key, jpg in zip(t.column("key").to_pylist(), t.column("jpg").to_pylist()):
                        kid = int(key)
                        if kid in ids:
                            out[kid] = (key, jpg)
    return out


def build(m: ray.data.Dataset, src: Layout, shards: list[dict], cfg: FilterConfig,
          cut) -> tuple[dict, dict[int, bytes]]:
    """(report section, key_id -> JPEG of each example) over the filter's input rows ``m``."""
    counts, missing, rows = np.zeros(BINS, np.int64), 0, []
    parts = m.select_columns(["key_id", "shard", "text", SCORE_COL]).map_batches(
        _block, fn_kwargs={"k": EXAMPLES}, batch_format="pyarrow", batch_size=None)
    for b in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for c, n, ex in zip(b.column("counts").to_pylist(), b.column("missing").to_pylist(),
                            b.column("examples").to_pylist()):
            counts += np.asarray(c)
            missing += n
            rows += json.loads(ex)
    rows.sort(key=lambda r: (r[SCORE_COL], r["key_id"]))
    low = rows[:EXAMPLES]
    high = [r for r in rows[::-1] if r not in low][:EXAMPLES]
    images = _images(src, shards, low + high)

    def entry(r: dict) -> dict:
        key = images.get(r["key_id"], (None, None))[0]
        return {"key": key, "shard": shards[r["shard"]]["shard"],
                "score": round(float(r[SCORE_COL]), 6), "text": r["text"]}

    section = {"lo": LO, "width": WIDTH, "counts": counts.tolist(), "missing": missing,
               "rows": int(counts.sum()), "thresholds": thresholds(cfg, cut),
               "lowest": [entry(r) for r in low], "highest": [entry(r) for r in high]}
    return section, {k: v[1] for k, v in images.items()}


def plot(section: dict, thumbs: dict, save) -> None:
    """score.png (the histogram, thresholds as vertical lines) and score_examples.png (the
    lowest pairs on the top row, the highest below, each with its score and caption)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    counts = np.asarray(section["counts"])
    nz = np.flatnonzero(counts)
    lo, hi = (nz[0], nz[-1] + 1) if len(nz) else (0, BINS)
    x = section["lo"] + section["width"] * np.arange(lo, hi)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x, counts[lo:hi], width=section["width"], align="edge", color="#4f81bd")
    for (rule, value), color in zip(section["thresholds"].items(), ("#c0504d", "#9bbb59")):
        ax.axvline(value, color=color, linestyle="--", label=f"{rule} {value:g}")
    if section["thresholds"]:
        ax.legend()
    ax.set_xlabel("pair_score (image-text cosine)")
    ax.set_ylabel("rows")
    ax.set_title(f"{section['rows']} scored rows")
    save(fig, "score.png")

    rows = [("lowest", section["lowest"]), ("highest", section["highest"])]
    ncol = max(1, max(len(r) for _, r in rows))
    fig, axes = plt.subplots(2, ncol, figsize=(1.9 * ncol, 5.2), squeeze=False)
    for i, (name, entries) in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(entries):
                continue
            e = entries[j]
            jpg = thumbs.get(int(e["key"])) if e["key"] is not None else None
            if jpg:
                img = Image.open(io.BytesIO(jpg)).convert("RGB")
                img.thumbnail((96, 96))
                ax.imshow(np.asarray(img))
            text = (e["text"] or "")[:40]
            ax.set_title(f"{name} {e['score']:.3f}\n{text[:20]}\n{text[20:]}", fontsize=7)
    save(fig, "score_examples.png")


def summary(section: dict) -> list[str]:
    th = ", ".join(f"{k} {v:g}" for k, v in section["thresholds"].items()) or "no score rule"
    lines = [f"  pair_score: {section['rows']} rows scored ({section['missing']} without a "
             f"score); {th}"]
    for name in ("lowest", "highest"):
        ex = section[name][:3]
        if ex:
            lines.append(f"    {name}: " + "; ".join(f"{e['score']:.3f} {e['text']!r}" for e in ex))
    return lines
