"""Per-shard output of the filter stage, in the download stage's layout.

Each download-stage shard is rewritten by one task that gets that shard's verdicts (a group
bounded by the shard size, never by a key's frequency): it reads the shard's live parquet
parts (image bytes included), keeps the rows without a reason, runs the optional safety hook
on them, and writes ``parquet/SHARD.parquet``, ``webdataset/SHARD.tar``,
``dropped/SHARD.parquet`` (with ``reason`` and ``detail``) and, last, ``_shards/SHARD.json``.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from align_ray.filter import report as report_lib
from align_ray.filter.config import FilterConfig
from align_ray.filter.neardup import CANDIDATES
from align_ray.filter.safety import load_hook
from align_ray.layout import DROPPED_COLUMNS, PARQUET, Layout


def read_parts(src: Layout, parts: list[str]) -> pa.Table:
    tables = [pq.read_table(src.path(p), filesystem=src.fs) for p in parts
              if p.startswith(f"{PARQUET}/")]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _dropped_table(rows: pa.Table, reasons: list[str], details: list[str]) -> pa.Table:
    meta = rows.drop_columns([c for c in ("jpg",) if c in rows.column_names])
    meta = meta.append_column("reason", pa.array(reasons, pa.string()))
    meta = meta.append_column("detail", pa.array(details, pa.string()))
    meta = meta.append_column("retryable", pa.array([False] * meta.num_rows, pa.bool_()))
    order = DROPPED_COLUMNS + [c for c in meta.column_names if c not in DROPPED_COLUMNS]
    return meta.select(order)


class ShardWriter:
    """``map_groups`` callable: the verdicts of one shard in, one stats row out."""

    def __init__(self, cfg: FilterConfig, shards: list[dict]):
        self.cfg = cfg
        self.shards = shards
        self.src = Layout(cfg.input)
        self.dst = Layout(cfg.output)
        self.hook = load_hook(cfg.safety_hook) if cfg.safety_hook else None

    def __call__(self, verdicts: pa.Table) -> pa.Table:
        info = self.shards[int(verdicts.column("shard")[0].as_py())]
        name = info["shard"]
        rows = read_parts(self.src, info["parts"])
        by_key = dict(zip(verdicts.column("key_id").to_pylist(),
                          zip(verdicts.column("reason").to_pylist(),
                              verdicts.column("detail").to_pylist())))
        keys = pc.cast(rows.column("key"), pa.int64()).to_pylist()
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise RuntimeError(f"shard {name}: {len(missing)} rows have no verdict "
                               f"(first key {missing[0]})")
        reasons = [by_key[k][0] for k in keys]
        details = [by_key[k][1] for k in keys]
        if CANDIDATES in verdicts.column_names:   # the near-duplicate search's count, every row
            cands = dict(zip(verdicts.column("key_id").to_pylist(),
                             verdicts.column(CANDIDATES).to_pylist()))
            if CANDIDATES in rows.column_names:   # an input that was filtered before: renewed
                rows = rows.drop_columns([CANDIDATES])
            rows = rows.append_column(CANDIDATES, pa.array([cands[k] for k in keys], pa.int64()))
        if self.hook is not None:
            self._apply_hook(rows, reasons, details)
        keep = np.array([r is None for r in reasons])
        kept = rows.filter(pa.array(keep))
        drop_idx = np.flatnonzero(~keep)
        dropped = _dropped_table(rows.take(pa.array(drop_idx, pa.int64())),
                                 [reasons[i] for i in drop_idx], [details[i] for i in drop_idx])
        parts = self.dst.write_samples(name, kept, parquet=self.cfg.write_parquet,
                                       webdataset=self.cfg.write_webdataset)
        dropped_file = self.dst.write_dropped(name, dropped)
        counts = Counter(reasons[i] for i in drop_idx)
        marker = {"shard": name, "input_rows": rows.num_rows, "output_rows": kept.num_rows,
                  "dropped": dict(counts), "parts": parts, "dropped_file": dropped_file}
        self.dst.write_marker(name, marker)
        hist = report_lib.histograms(kept)
        return pa.table({"stats": [json.dumps({**marker, "hist_after": hist})]})

    def _apply_hook(self, rows: pa.Table, reasons: list, details: list) -> None:
        idx = [i for i, r in enumerate(reasons) if r is None]
        if not idx:
            return
        verdict = self.hook(rows.take(pa.array(idx, pa.int64())))
        if len(verdict) != len(idx):
            raise RuntimeError(f"safety hook {self.cfg.safety_hook} returned {len(verdict)} "
                               f"verdicts for {len(idx)} rows")
        for i, v in zip(idx, verdict):
            if v:
                reasons[i], details[i] = "unsafe", str(v)
