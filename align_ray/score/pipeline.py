"""``align-ray score``: plan shards -> Ray Data over them (an actor pool of encoders) -> stats.

    DIR2/parquet/SHARD.parquet   every input column + image_embedding, text_embedding (float16
                                 fixed-size lists) + pair_score (float32 image-text cosine)
    DIR2/dropped/SHARD.parquet   rows whose image does not decode (reason decode_error)
    DIR2/_shards/SHARD.json      written last per shard: a rerun skips it
    DIR2/_manifest/score.json    the plan: input, model, columns, shards (a rerun must match)
    DIR2/stats.json              input_rows == output_rows + sum(dropped) over this stage

Shards: a data- or filter-stage input keeps its own shards (and names), read from the live
parts its markers list; any other parquet is cut into runs of whole row groups
(``shard_rows``).  The output is a stage directory in the same layout, so ``align-ray filter``
(the ``score_min`` / ``score_keep_fraction`` rules), ``train`` and ``index`` read it.  The
accounting is this stage's own: rows dropped upstream stay in the input's ``dropped/``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter

import pyarrow.parquet as pq

from align_ray import layout, storage, watchdog
from align_ray.batch_embed import pool_size
from align_ray.data.errors import InputError
from align_ray.layout import PARQUET, Layout
from align_ray.score.config import ScoreConfig
from align_ray.score.scorer import ShardScorer

log = logging.getLogger("align_ray.score")
PLAN = "score.json"


def _stage_shards(src: Layout) -> list[dict] | None:
    """The shards of a finished stage directory, or None when ``src`` is plain parquet."""
    stats = src.stats()
    markers = src.markers() if stats is not None else {}
    if not markers:
        return None
    if not stats.get("complete"):
        raise InputError(f"{src.uri}: the stage that wrote it is not complete (rerun it first)")
    return [{"shard": name, "files": [src.path(p) for p in m["parts"]
                                      if p.startswith(f"{PARQUET}/")],
             "row_groups": None, "rows": m["output_rows"]}
            for name, m in sorted(markers.items())]


def _parquet_shards(cfg: ScoreConfig) -> list[dict]:
    """Runs of whole row groups of at least ``shard_rows`` rows, file by file."""
    fs, files = layout.parquet_files(cfg.input)
    shards = []
    for i, path in enumerate(files):
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= cfg.shard_rows or g == meta.num_row_groups - 1:
                shards.append({"shard": f"{i:05d}_{len(shards):05d}", "files": [path],
                               "row_groups": groups, "rows": rows})
                groups, rows = [], 0
    return shards


def plan(cfg: ScoreConfig) -> dict:
    """The shards and resolved columns of ``cfg.input`` (raises on a missing column)."""
    from align_ray.model.external import resolve_spec

    src = Layout(cfg.input)
    shards = _stage_shards(src)
    if shards is None:
        shards = _parquet_shards(cfg)
    files = [f for s in shards for f in s["files"]]
    if not files:
        raise InputError(f"{cfg.input}: no rows to score")
    schema = layout.schema_of(src.fs, files)
    names = set(schema.names)
    image_col = cfg.image_col or layout.default_image_col(names)
    layout.require_columns(files[0], schema, [image_col, cfg.text_col],
                           "set --image-col / --text-col", image_col=image_col)
    if cfg.write_webdataset and not {"key", "jpg", "text"} <= names:
        raise ValueError("write_webdataset needs key, jpg and text columns")
    models = [resolve_spec(m) for m in cfg.models]
    return {"input": cfg.input, "model": models[0] if len(models) == 1 else models,
            "image_col": image_col,
            "text_col": cfg.text_col, "shards": shards,
            "input_rows": sum(s["rows"] for s in shards)}


def ensure_plan(cfg: ScoreConfig, dst: Layout) -> dict:
    """The plan of this output: made once, then reused so a rerun scores the same shards."""
    new = plan(cfg)
    path = dst.manifest(PLAN)
    if storage.exists(dst.fs, path):
        old = json.loads(storage.read_bytes(dst.fs, path))
        key = ("input", "model", "image_col", "text_col")
        if any(old[k] != new[k] for k in key):
            raise InputError(f"{cfg.output} already holds scores of another input, model or "
                             f"columns ({ {k: old[k] for k in key} }); use a new --output, or "
                             "--overwrite to start over")
        return old
    storage.write_bytes(dst.fs, path, json.dumps(new, indent=1).encode())
    return new


def summarize(p: dict, markers: dict[str, dict], seconds: float, cfg: ScoreConfig,
              source: dict | None) -> dict:
    dropped: Counter = Counter()
    for m in markers.values():
        dropped.update(m["dropped"])
    planned = {s["shard"]: s["rows"] for s in p["shards"]}
    wrong = [n for n, m in markers.items() if m["input_rows"] != planned.get(n)]
    if wrong:
        raise RuntimeError(f"score: shards {wrong[:5]} read another row count than planned "
                           "(did the input change? --overwrite starts over)")
    stats = {
        "input_rows": p["input_rows"],
        "output_rows": sum(m["output_rows"] for m in markers.values()),
        "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "complete": len(markers) == len(p["shards"]), "shards": len(p["shards"]),
        "input": cfg.input, "model": p["model"], "seconds_this_run": round(seconds, 3),
        "config": {k: v for k, v in vars(cfg).items() if k not in ("input", "output")},
    }
    if source:  # what the input stage itself dropped, for the whole funnel
        stats["source"] = {k: source.get(k) for k in ("input_rows", "output_rows", "dropped")}
    if stats["complete"]:
        assert stats["input_rows"] == stats["output_rows"] + sum(dropped.values()), \
            "row accounting broken"
    return stats


def run(cfg: ScoreConfig) -> dict:
    """Run (or resume) the score stage; returns the stats also written to stats.json."""
    import ray.data

    t0 = time.time()
    if not all(cfg.models) or not cfg.input or not cfg.output:
        raise ValueError("score: model (or fold_models), input and output are required")
    watchdog.install("score", cfg.stall_timeout_s)
    dst = Layout(cfg.output)
    if cfg.overwrite:
        dst.clear()
    p = ensure_plan(cfg, dst)
    markers = dst.markers()
    todo = [s for s in p["shards"] if s["shard"] not in markers]
    if todo:
        actors, cpus = pool_size(cfg)
        actors = min(actors, len(todo))
        ds = ray.data.from_items([{"spec": json.dumps(s)} for s in todo],
                                 override_num_blocks=len(todo))
        out = ds.map_batches(
            ShardScorer, batch_size=1, num_cpus=cpus, num_gpus=cfg.num_gpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            fn_constructor_kwargs=dict(cfg=cfg, model=p["model"], image_col=p["image_col"],
                                       threads=max(1, math.ceil(cpus))))
        for row in out.iter_rows():
            info = json.loads(row["stats"])
            markers[info["shard"]] = info
    stats = summarize(p, markers, time.time() - t0, cfg, Layout(cfg.input).stats())
    stats["shards_this_run"] = len(todo)
    dst.write_stats(stats)
    return stats


def summary_line(stats: dict) -> str:
    n, kept = stats["input_rows"], stats["output_rows"]
    top = ", ".join(f"{r} {c}" for r, c in stats["dropped"].items()) or "none"
    return (f"align-ray score: {kept}/{n} rows scored, {n - kept} dropped [{top}], "
            f"{stats['shards_this_run']}/{stats['shards']} shards this run, "
            f"{stats['seconds_this_run']:.1f}s, complete={stats['complete']}")
