"""The Ray Data UDF of ``align-ray score``: one call = one shard, read -> decode -> embed ->
score -> write, in the stage layout.

A shard is the unit of work and of atomicity, as in the download stage: its parquet (and
dropped) files are written, then its marker; a killed run leaves at most unmarked shards, which
the rerun redoes whole.  Each actor loads the model once and embeds its shard ``batch_size``
pairs at a time, so a shard's image bytes are the only large thing it holds.  With cross-fitting
(``fold_models``) it loads every fold's model and scores each row with its caption's fold's.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from align_ray import batch_embed, storage
from align_ray.layout import DROPPED_FIELDS, Layout, schema
from align_ray.score.config import ScoreConfig

SCORE_COLUMNS = ("image_embedding", "text_embedding", "pair_score")
DECODE_ERROR = "decode_error"   # the download stage's reason for bytes that are no image


def read_shard(fs, spec: dict) -> pa.Table | None:
    """The rows of one planned shard: whole files (a stage dir's parts) or some row groups."""
    tables = []
    for path in spec["files"]:
        pf = pq.ParquetFile(fs.open_input_file(path))
        groups = spec.get("row_groups")
        tables.append(pf.read_row_groups(groups) if groups is not None else pf.read())
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _fixed_f16(x: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x.reshape(-1, dim), dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine; the Embedders already L2-normalise, but an external model's output is
    not ours to promise, so the norms are divided out here."""
    num = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (num / np.maximum(den, 1e-12)).astype(np.float32)


def dropped_table(rows: pa.Table, image_col: str, text_col: str, details: list[str]) -> pa.Table:
    """Undecodable rows in the layout's dropped schema, every other input column carried."""
    n = rows.num_rows

    def col(name: str) -> pa.Array:
        if name in rows.column_names:
            return rows.column(name).cast(pa.string())
        return pa.nulls(n, pa.string())

    base = {"key": col("key"), "url": col("url"), "text": col(text_col),
            "reason": pa.array([DECODE_ERROR] * n, pa.string()),
            "detail": pa.array(details, pa.string()),
            "retryable": pa.array([False] * n, pa.bool_())}
    extra = {c: rows.column(c) for c in rows.column_names
             if c not in base and c != image_col and c not in SCORE_COLUMNS}
    out = schema(DROPPED_FIELDS, {c: a.type for c, a in extra.items()})
    return pa.table({**base, **extra}, schema=out)


class ShardScorer:
    """Callable class for ``Dataset.map_batches``: a batch holds shard specs (JSON)."""

    def __init__(self, cfg: ScoreConfig, model: str | list[str], image_col: str,
                 threads: int = 1):
        self.cfg, self.image_col = cfg, image_col
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        self.embedders = [batch_embed.actor_embedder(m, device, threads)
                          for m in ([model] if isinstance(model, str) else model)]
        if len({e.dim for e in self.embedders}) > 1:
            raise ValueError("fold_models must share one embedding size")
        self.embedder = self.embedders[0]
        self.fs = storage.filesystem(cfg.input)[0]
        self.dst = Layout(cfg.output)

    def __call__(self, batch: dict) -> dict:
        return {"stats": [json.dumps(self.process(json.loads(s))) for s in batch["spec"]]}

    def embed(self, table: pa.Table) -> tuple[list[int], np.ndarray, np.ndarray, dict[int, str]]:
        """(kept row indices, image and text embeddings of those rows, {row: why dropped})."""
        bs, dim = self.cfg.batch_size, self.embedder.dim
        keep, imgs, txts, failed = [], [], [], {}
        texts_all = table.column(self.cfg.text_col).to_pylist()
        if len(self.embedders) == 1:
            groups = [(self.embedder, np.arange(table.num_rows))]
        else:   # cross-fitting: each row by the model that did not train on its fold
            from align_ray.train.selection import caption_fold

            k = len(self.embedders)
            fold = np.asarray([caption_fold(t, k) for t in texts_all], dtype=np.int64)
            groups = [(e, np.flatnonzero(fold == i)) for i, e in enumerate(self.embedders)]
        column = table.column(self.image_col)
        for embedder, rows in groups:
            images = column if len(groups) == 1 else column.take(pa.array(rows, pa.int64()))
            for off in range(0, len(rows), bs):
                got = batch_embed.embed_pairs(embedder, images.slice(off, bs).to_pylist(),
                                              [texts_all[i] for i in rows[off:off + bs]])
                keep += [int(rows[off + j]) for j in got.keep]
                imgs.append(got.image_emb.reshape(-1, dim))
                txts.append(got.text_emb.reshape(-1, dim))
                failed.update({int(rows[off + j]): why for j, why in got.failed.items()})
        empty = np.zeros((0, dim), np.float32)
        img = np.concatenate(imgs) if imgs else empty
        txt = np.concatenate(txts) if txts else empty
        order = np.argsort(np.asarray(keep, dtype=np.int64), kind="stable")  # input row order
        return [keep[i] for i in order], img[order], txt[order], failed

    def process(self, spec: dict) -> dict:
        t0 = time.time()
        name = spec["shard"]
        table = read_shard(self.fs, spec)
        if table is None:
            table = pa.table({self.image_col: pa.array([], pa.binary()),
                              self.cfg.text_col: pa.array([], pa.string())})
        keep, img, txt, failed = self.embed(table)
        dim = self.embedder.dim
        # a rescored input gets the new model's columns, not a second copy of the old ones
        kept = table.take(pa.array(keep, pa.int64()))
        kept = kept.drop_columns([c for c in SCORE_COLUMNS if c in kept.column_names])
        kept = (kept.append_column("image_embedding", _fixed_f16(img, dim))
                    .append_column("text_embedding", _fixed_f16(txt, dim))
                    .append_column("pair_score", pa.array(cosine(img, txt), pa.float32())))
        bad = sorted(failed)
        dropped = dropped_table(table.take(pa.array(bad, pa.int64())), self.image_col,
                                self.cfg.text_col, [failed[i] for i in bad])
        parts = self.dst.write_samples(name, kept, parquet=True,
                                       webdataset=self.cfg.write_webdataset)
        dropped_file = self.dst.write_dropped(name, dropped)
        marker = {"shard": name, "input_rows": table.num_rows, "output_rows": kept.num_rows,
                  "dropped": {DECODE_ERROR: len(bad)} if bad else {}, "parts": parts,
                  "dropped_file": dropped_file, "seconds": round(time.time() - t0, 3)}
        self.dst.write_marker(name, marker)  # last: the shard is complete
        return marker
