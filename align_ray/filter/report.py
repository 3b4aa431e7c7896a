"""The filter report: counts per rule, the most frequent dropped alt-texts, the most repeated
images, and text-length / image-size histograms before and after (PNG + JSON + console text);
with scored input, the ``pair_score`` section of :mod:`align_ray.filter.score_report`.

Everything here is computed from small per-block partial results (histograms, top-k lists);
nothing row-sized reaches the driver."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from align_ray import storage
from align_ray.filter.rules import token_counts
from align_ray.filter.shuffle import Agg, aggregate

TOKEN_BINS = list(range(0, 41))                       # 0..39 tokens, then ">= 40"
SIDE_BINS = [0, 64, 128, 200, 201, 256, 384, 512, 768, 1024, 2048, 1 << 30]


def _hist(values: np.ndarray, bins: list[int]) -> list[int]:
    idx = np.clip(np.searchsorted(bins, values, side="right") - 1, 0, len(bins) - 2)
    return np.bincount(idx, minlength=len(bins) - 1).astype(int).tolist()


def histograms(rows: pa.Table) -> dict:
    """{tokens, min_side}: histograms of a table of output rows (text + original sizes)."""
    if rows.num_rows == 0:
        return {"tokens": [0] * (len(TOKEN_BINS) - 1), "min_side": [0] * (len(SIDE_BINS) - 1)}
    w = rows.column("original_width").to_numpy(zero_copy_only=False)
    h = rows.column("original_height").to_numpy(zero_copy_only=False)
    return {"tokens": _hist(token_counts(rows.column("text")), TOKEN_BINS),
            "min_side": _hist(np.minimum(w, h), SIDE_BINS)}


def _hist_block(batch: pa.Table) -> pa.Table:
    return pa.table({"tokens": [_hist(batch.column("n_tok").to_numpy(), TOKEN_BINS)],
                     "min_side": [_hist(batch.column("min_side").to_numpy(), SIDE_BINS)]})


def histograms_before(m: ray.data.Dataset) -> dict:
    out = {"tokens": np.zeros(len(TOKEN_BINS) - 1, int),
           "min_side": np.zeros(len(SIDE_BINS) - 1, int)}
    parts = m.select_columns(["n_tok", "min_side"]).map_batches(
        _hist_block, batch_format="pyarrow", batch_size=None)
    for b in parts.iter_batches(batch_format="pyarrow", batch_size=None):
        for name in out:
            for row in b.column(name).to_pylist():
                out[name] += np.asarray(row)
    return {k: v.tolist() for k, v in out.items()}


def merge_hist(total: dict | None, part: dict) -> dict:
    if total is None:
        return {k: list(v) for k, v in part.items()}
    return {k: [a + b for a, b in zip(total[k], part[k])] for k in total}


def _topk_block(batch: pa.Table, by: str, k: int) -> pa.Table:
    if batch.num_rows <= k:
        return batch
    idx = np.argpartition(-batch.column(by).to_numpy(), k - 1)[:k]
    return batch.take(pa.array(idx, pa.int64()))


def top_k(ds: ray.data.Dataset, by: str, k: int) -> list[dict]:
    small = ds.map_batches(_topk_block, fn_kwargs={"by": by, "k": k}, batch_format="pyarrow",
                           batch_size=None)
    rows = [r for b in small.iter_batches(batch_format="pyarrow", batch_size=None)
            for r in b.to_pylist()]
    return sorted(rows, key=lambda r: -r[by])[:k]


def top_dropped_texts(verdicts: ray.data.Dataset, m: ray.data.Dataset, k: int,
                      num_partitions: int) -> list[dict]:
    counts = aggregate(verdicts, ["text_hash"], [Agg("rows", "count")], num_partitions,
                       where=pc.field("reason").is_valid())
    top = top_k(counts, "rows", k)
    texts = _examples(m, "text_hash", [t["text_hash"] for t in top], ["text"])
    return [{"text": texts.get(t["text_hash"], {}).get("text"), "dropped_rows": t["rows"]}
            for t in top]


def top_images(images: ray.data.Dataset, m: ray.data.Dataset, k: int) -> list[dict]:
    top = top_k(images, "image_rows", k)
    ex = _examples(m, "img_id", [t["img_id"] for t in top], ["key_id", "shard", "text"])
    return [{"rows": t["image_rows"], "distinct_texts": t["n_texts"],
             "example_key": f"{ex[t['img_id']]['key_id']:014d}" if t["img_id"] in ex else None,
             "example_shard": ex.get(t["img_id"], {}).get("shard"),
             "example_text": ex.get(t["img_id"], {}).get("text")} for t in top]


def _first_matches(batch: pa.Table, key: str, wanted: list, cols: list[str]) -> pa.Table:
    hit = batch.filter(pc.is_in(batch.column(key), pa.array(wanted, batch.schema.field(key).type)))
    return hit.select([key] + cols)


def _examples(m: ray.data.Dataset, key: str, wanted: list, cols: list[str]) -> dict:
    if not wanted:
        return {}
    hits = m.map_batches(_first_matches, fn_kwargs={"key": key, "wanted": wanted, "cols": cols},
                         batch_format="pyarrow", batch_size=None)
    out: dict = {}
    for b in hits.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in b.to_pylist():
            out.setdefault(r[key], r)
    return out


def funnel(input_rows: int, dropped: dict, rules: tuple, enabled) -> list[dict]:
    """Rows left after each enabled rule, in the order the rules are applied (a row is
    counted under the first rule it breaks)."""
    left, out = input_rows, []
    for rule in rules:
        if enabled(rule) or dropped.get(rule):
            left -= dropped.get(rule, 0)
            out.append({"rule": rule, "dropped": dropped.get(rule, 0), "rows_left": left})
    return out


def plot(report: dict, out_dir_uri: str, thumbs: dict | None = None) -> list[str]:
    """Write rules.png, tokens.png and image_size.png next to report.json, and with a
    ``pair_score`` section score.png and score_examples.png (``thumbs``: key_id -> JPEG of its
    examples); returns the names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, root = storage.filesystem(out_dir_uri)
    names = []

    def save(fig, name):
        import io
        import warnings
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # a crawl's captions (the score examples, the top tokens) are in every script; a
            # glyph the font lacks is drawn as a box, and matplotlib's warning per missing glyph
            # would bury the stage's own output
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        storage.write_bytes(fs, storage.join(root, name), buf.getvalue())
        names.append(name)

    rules = report["dropped"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(3, len(rules)) + 1))
    ax.barh(list(rules)[::-1], list(rules.values())[::-1], color="#c0504d")
    ax.set_xlabel("rows dropped")
    ax.set_title(f"{report['output_rows']}/{report['input_rows']} rows kept")
    save(fig, "rules.png")
    for key, bins, title, name in (
            ("tokens", TOKEN_BINS, "alt-text unigrams", "tokens.png"),
            ("min_side", SIDE_BINS, "image shorter side (px, original)", "image_size.png")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [str(b) for b in bins[:-1]]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, report["hist_before"][key], 0.4, label="before")
        ax.bar(x + 0.2, report["hist_after"][key], 0.4, label="after")
        step = max(1, len(labels) // 12)
        ax.set_xticks(x[::step], labels[::step])
        ax.set_xlabel(title)
        ax.set_ylabel("rows")
        ax.legend()
        save(fig, name)
    if report.get("pair_score"):
        from align_ray.filter import score_report
        score_report.plot(report["pair_score"], thumbs or {}, save)
    return names


def text_summary(report: dict) -> str:
    n, kept = report["input_rows"], report["output_rows"]
    lines = [f"filter: {kept}/{n} rows kept ({100 * kept / max(n, 1):.1f}%) of the downloaded "
             f"corpus; vocabulary {report.get('vocab', {})}"]
    for rule, c in report["dropped"].items():
        lines.append(f"  {rule:<22} {c}")
    if report.get("funnel"):
        lines.append("  funnel: " + " -> ".join(f"{f['rule']} {f['rows_left']}"
                                                for f in report["funnel"]))
    if report.get("semdedup"):
        s = report["semdedup"]
        lines.append(f"  semdedup: {s['clusters']} clusters ({s['nonempty']} non-empty), sizes "
                     f"max {s['max']} median {s['median']}, eps {s['eps']}, "
                     f"{s['dropped']} dropped")
        km = s.get("kmeans")
        if km and km["passes"]:   # how far the passes over every row moved the sample's start
            lines.append(f"    k-means: start from {km['train_rows']} sampled rows, "
                         f"{km['passes']} passes over all rows, mean cosine to centroid "
                         f"{km['mean_cosine'][0]} -> {km['mean_cosine'][-1]}")
    if report.get("near_duplicate"):
        nd = report["near_duplicate"]
        lines.append(f"  near_duplicate (pHash <= {nd['distance']} bits, bands {nd['bands']}): "
                     f"{nd['images_with_an_earlier_near_duplicate']}/{nd['images']} images have "
                     f"an earlier near-duplicate; candidates per image mean "
                     f"{nd['candidates_per_image']['mean']}, max {nd['candidates_per_image']['max']}")
    if report.get("balance"):
        b = report["balance"]
        lines.append(f"  metaclip_balance: {b['entries_matched']}/{b['entries']} entries "
                     f"matched, {b['entries_over_cap']} over the cap {b['cap']}; largest "
                     + ", ".join(f"{e['entry']!r} {e['pairs']}" for e in b["largest"]))
    if report.get("pair_score"):
        from align_ray.filter import score_report
        lines += score_report.summary(report["pair_score"])
    if report.get("top_dropped_texts"):
        lines.append("  most frequent dropped alt-texts:")
        lines += [f"    {t['dropped_rows']:>7}  {t['text']!r}"
                  for t in report["top_dropped_texts"][:5]]
    if report.get("top_images"):
        lines.append("  most repeated images:")
        lines += [f"    {t['rows']:>7} rows, {t['distinct_texts']} texts, e.g. key "
                  f"{t['example_key']} {t['example_text']!r}" for t in report["top_images"][:5]]
    return "\n".join(lines)


def dumps(report: dict) -> bytes:
    return json.dumps(report, indent=1, ensure_ascii=False, default=int).encode()
