"""``align-ray filter``: download-stage output -> ALIGN's frequency rules -> same layout.

    DIR2/parquet|webdataset/SHARD.*     the surviving rows, per download-stage shard
    DIR2/dropped/SHARD.parquet          rows this stage dropped: reason (the rule), detail
    DIR2/dropped/download-SHARD.parquet the download stage's dropped rows, carried over
    DIR2/stats.json                     input_rows == output_rows + sum(dropped), both stages
    DIR2/report.json + *.png            counts per rule, top dropped texts, top images, histograms,
                                        pair_score histogram + lowest/highest pairs (scored input)

The global plan (plan.py) has to see the whole corpus, so the stage is all-or-nothing: a rerun
of a completed output returns its stats; an incomplete one is redone from scratch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from align_ray import ray_env, storage, watchdog
from align_ray.data.errors import InputError
from align_ray.filter import plan as plan_lib
from align_ray.filter import report as report_lib
from align_ray.filter import balance, score_report, semdedup
from align_ray.filter.config import RULES, FilterConfig
from align_ray.filter.evalset import load_hashes
from align_ray.filter.safety import load_hook
from align_ray.filter.shuffle import map_groups
from align_ray.filter.writer import ShardWriter
from align_ray.layout import PARQUET, Layout

log = logging.getLogger("align_ray.filter")


def _stage1(cfg: FilterConfig) -> tuple[Layout, dict, list[dict]]:
    src = Layout(cfg.input)
    stats = src.stats()
    if stats is None:
        raise InputError(f"{cfg.input} is not a download-stage output (no stats.json); "
                         "run `align-ray data` first")
    if not stats.get("complete"):
        raise InputError(f"{cfg.input}: the download stage is not complete "
                         "(rerun `align-ray data` with the same arguments to finish it)")
    shards = [m for _, m in sorted(src.markers().items())]
    if any(m["output_rows"] and not any(p.startswith(f"{PARQUET}/") for p in m["parts"])
           for m in shards):
        raise InputError(f"{cfg.input}: the download stage wrote no parquet "
                         "(write_parquet: false); the filter reads parquet")
    return src, stats, shards


def _with_shard(batch: pa.Table, index: dict[str, int]) -> pa.Table:
    names = [p.rsplit("/", 1)[-1].split(".", 1)[0] for p in batch.column("path").to_pylist()]
    return batch.drop_columns(["path"]).append_column(
        "shard", pa.array([index[n] for n in names], pa.int32()))


def check_columns(src: Layout, shards: list[dict], cfg: FilterConfig) -> None:
    """Fail before any work when the input lacks a column the plan or SemDeDup reads (the first
    parquet's schema, read once)."""
    columns = plan_lib.meta_cols(cfg)
    files = [src.path(p) for m in shards for p in m["parts"] if p.startswith(f"{PARQUET}/")]
    if not files:
        return
    names = pq.read_schema(files[0], filesystem=src.fs).names
    if plan_lib.SCORE_COL in columns and plan_lib.SCORE_COL not in names:
        raise InputError(f"{src.uri} has no {plan_lib.SCORE_COL} column, which score_min / "
                         "score_keep_fraction need: run `align-ray score` on it first")
    # `align-ray score` also takes a plain parquet and carries its columns through, so a scored
    # folder may lack what the download stage writes (a Ray task would fail with a KeyError)
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{src.uri} has no {', '.join(missing)} column(s): the filter reads the "
                         "download stage's output (`align-ray data`), or `align-ray score`'s "
                         "output of it, not a plain parquet")
    if cfg.enabled(semdedup.RULE):
        semdedup.check_columns(src.uri, names)   # run `score` first


def read_rows(src: Layout, shards: list[dict],
              columns: list[str] = plan_lib.META_COLS) -> ray.data.Dataset:
    """The metadata columns of every downloaded row, tagged with its shard's index."""
    files = [src.path(p) for m in shards for p in m["parts"] if p.startswith(f"{PARQUET}/")]
    if not files:
        raise InputError(f"{src.uri}: the download stage produced no rows")
    index = {m["shard"]: i for i, m in enumerate(shards)}
    ds = ray_env.read_parquet(files, filesystem=src.fs, columns=columns, include_paths=True)
    return ds.map_batches(_with_shard, fn_kwargs={"index": index}, batch_format="pyarrow",
                          batch_size=None)


def _write_group(verdicts: pa.Table, cfg: FilterConfig, shards: list[dict]) -> pa.Table:
    return ShardWriter(cfg, shards)(verdicts)


@ray.remote(num_cpus=0.5)
def _copy_dropped(items: list[dict], src_uri: str, dst_uri: str) -> int:
    """Carry the download stage's dropped-row files over (a few hundred per task)."""
    src, dst = Layout(src_uri), Layout(dst_uri)
    for item in items:
        data = storage.read_bytes(src.fs, src.path(item["dropped_file"]))
        storage.write_bytes(dst.fs, dst.dropped(f"download-{item['shard']}"), data)
    return len(items)


def partitions(cfg: FilterConfig, rows: int) -> int:
    """Shuffle partitions (one reduce task each, :mod:`align_ray.filter.shuffle`): ~1 M
    metadata rows per partition (~50 MB in one reducer), and up to one per CPU while each gets
    >= 250 k rows, so every core reduces without drowning small corpora in tiny tasks.
    1.8 B rows on 1,600 CPUs: 1,800 partitions."""
    if cfg.num_partitions:
        return cfg.num_partitions
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, math.ceil(rows / 1_000_000), min(cpus, math.ceil(rows / 250_000)))


def run(cfg: FilterConfig) -> dict:
    """Run the filter stage; returns the stats also written to DIR2/stats.json."""
    t0 = time.time()
    if not cfg.input or not cfg.output:
        raise ValueError("filter: input and output are required")
    watchdog.install("filter", cfg.stall_timeout_s)
    src, stats1, shards = _stage1(cfg)
    dst = Layout(cfg.output)
    if not cfg.overwrite and dst.is_complete(input=cfg.input):
        log.info("filter: %s is complete; nothing to do (--overwrite redoes it)", cfg.output)
        return dst.stats()
    check_columns(src, shards, cfg)   # before clearing anything
    if cfg.enabled(balance.RULE):
        balance.load_entries(cfg.balance_entries)  # the same for a missing or empty file
    dst.clear()
    if cfg.safety_hook:
        load_hook(cfg.safety_hook)  # fail fast on a typo, before any work
    eval_hashes = load_hashes(cfg.eval_sets, cfg.eval_image_col)
    npart = partitions(cfg, stats1["output_rows"])
    plan = plan_lib.build(read_rows(src, shards, plan_lib.meta_cols(cfg)), cfg, eval_hashes,
                          npart)
    plan.verdicts = plan.verdicts.materialize()
    sem = None
    if cfg.enabled(semdedup.RULE):
        verdicts, sem = semdedup.apply(src, shards, plan.verdicts, cfg, npart)
        plan.verdicts = verdicts.materialize()
    written = map_groups(plan.verdicts, "shard", _write_group, npart,
                         {"cfg": cfg, "shards": shards})
    dropped: Counter = Counter()
    kept, filtered_in, hist_after = 0, 0, None
    for row in (r for ref in written for r in ray.get(ref).to_pylist()):
        info = json.loads(row["stats"])
        kept += info["output_rows"]
        filtered_in += info["input_rows"]
        dropped.update(info["dropped"])
        hist_after = report_lib.merge_hist(hist_after, info["hist_after"])
    with_drops = [{"shard": m["shard"], "dropped_file": m["dropped_file"]} for m in shards
                  if m.get("dropped_file")]
    ray.get([_copy_dropped.remote(with_drops[i:i + 500], cfg.input, cfg.output)
             for i in range(0, len(with_drops), 500)])
    total_dropped = Counter(stats1["dropped"]) + dropped
    if filtered_in != stats1["output_rows"]:
        raise RuntimeError(f"filter read {filtered_in} rows but the download stage wrote "
                           f"{stats1['output_rows']}")
    stats = {
        "input_rows": stats1["input_rows"], "output_rows": kept,
        "dropped": dict(sorted(total_dropped.items(), key=lambda kv: -kv[1])),
        "complete": True, "input": cfg.input,
        "stages": {"data": {k: stats1[k] for k in ("input_rows", "output_rows", "dropped")},
                   "filter": {"input_rows": filtered_in, "output_rows": kept,
                              "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1]))}},
        "vocab": plan.vocab, "partitions": npart,
        "score_cut": vars(plan.score_cut) if plan.score_cut else None,
        "semdedup": sem, "balance": plan.balance, "near_duplicate": plan.near_dup,
        "config": {k: v for k, v in vars(cfg).items() if k not in ("input", "output")},
    }
    assert stats["input_rows"] == kept + sum(total_dropped.values()), "row accounting broken"
    if cfg.report:
        rep = {**stats["stages"]["filter"], "vocab": plan.vocab,
               "funnel": report_lib.funnel(filtered_in, dropped, RULES, cfg.enabled),
               "hist_before": report_lib.histograms_before(plan.rows),
               "hist_after": hist_after or report_lib.histograms(pa.table(
                   {"text": pa.array([], pa.string()), "original_width": pa.array([], pa.int32()),
                    "original_height": pa.array([], pa.int32())})),
               "top_dropped_texts": report_lib.top_dropped_texts(plan.verdicts, plan.rows,
                                                                 cfg.report_top, npart),
               "top_images": report_lib.top_images(plan.images, plan.rows, cfg.report_top),
               "semdedup": sem, "balance": plan.balance, "near_duplicate": plan.near_dup}
        thumbs = None
        if cfg.needs_score():
            rep["pair_score"], thumbs = score_report.build(plan.rows, src, shards, cfg,
                                                           plan.score_cut)
        storage.write_bytes(dst.fs, dst.path("report.json"), report_lib.dumps(rep))
        rep["plots"] = report_lib.plot(rep, cfg.output, thumbs)
        stats["report"] = report_lib.text_summary(rep)
    stats["seconds"] = round(time.time() - t0, 3)
    dst.write_stats(stats)
    return stats


def summary_line(stats: dict) -> str:
    f = stats["stages"]["filter"]
    top = ", ".join(f"{r} {c}" for r, c in list(f["dropped"].items())[:6])
    return (f"align-ray filter: {f['output_rows']}/{f['input_rows']} downloaded rows kept "
            f"[{top}]; overall {stats['output_rows']}/{stats['input_rows']} input rows, "
            f"{stats.get('seconds', 0):.1f}s")
