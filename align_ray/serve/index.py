"""``align-ray index``: Ray Data batch inference over a corpus -> an index directory.

``read_parquet`` -> ``map_batches(_EmbedBatch, concurrency=N)`` (an actor pool, each actor loads the
model once) -> ``write_parquet`` shards (embeddings as fixed-size float32 lists + metadata + small
JPEG thumbnails) -> the driver streams the shards, in order, into ``{image,text}_embeddings.npy``,
``metadata.parquet`` and ``thumbs.parquet`` (layout: :mod:`align_ray.serve.store`).

Rows whose image does not decode are dropped (counted in ``index.json``).  pHash / text hash come
from the corpus when it has them (the data stage writes both), else they are computed here with
the data stage's own functions, so dedup works on any parquet.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from align_ray import batch_embed, layout, ray_env, storage, watchdog
from align_ray.batch_embed import pool_size
from align_ray.serve import ann, store
from align_ray.serve.config import IndexConfig

log = logging.getLogger(__name__)
META_COLUMNS = ("key", "url", "phash", "text_hash", "sha256", "width", "height")


def resolve_input(cfg: IndexConfig) -> tuple[list[str], Any, str, list[str]]:
    """(files, filesystem, image column, extra metadata columns) of ``cfg.data``."""
    fs, files = layout.parquet_files(cfg.data)
    schema = layout.schema_of(fs, files)
    names = set(schema.names)
    image_col = cfg.image_col or layout.default_image_col(names)
    layout.require_columns(files[0], schema, [image_col, cfg.text_col],
                           "set --image-col / --text-col", image_col=image_col)
    extra = [c for c in META_COLUMNS if c in names and c not in (image_col, cfg.text_col)]
    return files, fs, image_col, extra


class _EmbedBatch:
    """Actor-pool UDF: one Embedder per actor; batch in -> embeddings + metadata out."""

    def __init__(self, model_dir: str, image_col: str, text_col: str, extra: list[str],
                 thumb_size: int, device: str, threads: int = 1):
        self.embedder = batch_embed.actor_embedder(model_dir, device, threads)
        self.image_col, self.text_col, self.extra = image_col, text_col, extra
        self.thumb_size = thumb_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from align_ray.data import hashing

        raw = batch.column(self.image_col).to_pylist()
        got = batch_embed.embed_pairs(self.embedder, raw, batch.column(self.text_col).to_pylist())
        keep, texts, pils = got.keep, got.texts, got.images
        if self.thumb_size > self.embedder.image_size:  # JPEG drafts at the model size are
            pils = [batch_embed.decode(raw[j], self.thumb_size)[0] for j in keep]  # too small
        cols: dict[str, Any] = {"text": pa.array(texts, pa.string())}
        for c in self.extra:
            cols[c] = batch.column(c).take(pa.array(keep, pa.int64()))
        if "phash" not in cols:
            cols["phash"] = pa.array([_phash(p, hashing) for p in pils], pa.uint64())
        if "text_hash" not in cols:
            cols["text_hash"] = pa.array([hashing.text_hash(t) for t in texts], pa.uint64())
        if self.thumb_size:
            cols["thumb"] = pa.array([_thumb(p, self.thumb_size) for p in pils], pa.binary())
        cols["image_emb"] = _fixed_list(got.image_emb.reshape(len(keep), self.embedder.dim))
        cols["text_emb"] = _fixed_list(got.text_emb.reshape(len(keep), self.embedder.dim))
        return pa.table(cols)


def _phash(im, hashing) -> int:
    return hashing.phash(np.asarray(im.convert("L")))


def _thumb(im, size: int) -> bytes:
    im = im.copy()
    im.thumbnail((size, size))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def build(cfg: IndexConfig) -> dict[str, Any]:
    """Run the Ray Data job and assemble the index dir; returns the manifest (``index.json``).

    ``output`` is local or ``s3://``.  The actors write their shards to ``OUTPUT/shards`` (on S3
    for an S3 output, so actors on any node can write them); the driver then streams the shards
    into the npy/parquet files in a local staging folder and, for S3, uploads them, ``index.json``
    last (a reader that finds it finds a complete index)."""
    import ray.data

    if not cfg.model or not cfg.data or not cfg.output:
        raise ValueError("model, data and output are required")
    files, fs, image_col, extra = resolve_input(cfg)
    out_fs, out = storage.filesystem(cfg.output)
    remote = not storage.is_local(out_fs)
    if storage.exists(out_fs, storage.join(out, store.META_FILE)) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} already holds an index (set overwrite)")
    shards = storage.join(out, "shards")
    if storage.exists(out_fs, shards):
        out_fs.delete_dir(shards)
    stage = tempfile.mkdtemp(prefix="align-index-") if remote else out
    os.makedirs(stage, exist_ok=True)
    t0 = time.time()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True   # ids follow corpus order
    watchdog.install("index", cfg.stall_timeout_s)
    actors, actor_cpus = pool_size(cfg)
    ds = ray_env.read_parquet(files, filesystem=fs, columns=[image_col, cfg.text_col, *extra])
    if len(files) < 2 * actors:   # few files: cut them into batch-sized blocks, so
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)  # every actor gets work
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    rows_in = sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)
    rows_in = min(rows_in, cfg.limit) if cfg.limit else rows_in
    from align_ray.model.external import resolve_spec

    model = resolve_spec(cfg.model)  # the manifest records the real spec, open_clip: ones whole
    ds = ds.map_batches(
        _EmbedBatch, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=actor_cpus, num_gpus=cfg.num_gpus,
        fn_constructor_kwargs=dict(model_dir=model, image_col=image_col,
                                   text_col=cfg.text_col, extra=extra,
                                   thumb_size=cfg.thumb_size if cfg.thumbnails else 0,
                                   device="cuda" if cfg.num_gpus > 0 else "cpu",
                                   threads=max(1, math.ceil(actor_cpus))))
    ds.write_parquet(shards, filesystem=out_fs)
    try:
        manifest = assemble(stage, shards, model=model, source=cfg.data, rows_in=rows_in,
                            fs=out_fs)
        if cfg.ann.shards > 1:    # per-shard indexes instead of one (serve/ann_shards.py)
            from align_ray.serve import ann_shards

            sharded = ann_shards.build(stage, manifest, cfg.ann, parts=_add_parts(cfg))
            manifest["ann"] = {"kind": "flat", "recall_at_k": 1.0}
            if sharded is not None:
                manifest[ann_shards.SECTION] = sharded
        else:
            manifest["ann"] = ann.build(stage, manifest, cfg.ann, parts=_add_parts(cfg))
        manifest["seconds"] = round(time.time() - t0, 2)
        if remote:
            for name in sorted(os.listdir(stage)):
                with open(os.path.join(stage, name), "rb") as src, \
                        out_fs.open_output_stream(storage.join(out, name)) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            storage.write_bytes(out_fs, storage.join(out, store.META_FILE),
                                json.dumps(manifest, indent=2).encode())
        else:
            _write_manifest(out, manifest)
    finally:
        if remote:
            shutil.rmtree(stage, ignore_errors=True)
    log.info("index: %d rows (%d dropped) -> %s in %.1f s", manifest["count"],
             manifest["dropped"], cfg.output, manifest["seconds"])
    return manifest


def _add_parts(cfg: IndexConfig) -> int:
    """Parallel add tasks for an IVF index: ``ann.add_parts``, else the cluster's CPUs (<= 8)."""
    import ray

    if cfg.ann.add_parts:
        return cfg.ann.add_parts
    return max(1, min(8, int(ray.available_resources().get("CPU", 1))))


def assemble(out: str, shards: str, *, model: str, source: str, rows_in: int,
             fs: Any = None) -> dict[str, Any]:
    """Stream the shard files (in name order; on ``fs``, default local) into the npy / parquet
    files of the local index dir ``out``."""
    fs = fs or storage.filesystem(shards)[0]
    files = [f for f in storage.list_files(fs, shards) if f.endswith(".parquet")]
    counts = [pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files]
    n = sum(counts)
    if n == 0:
        raise ValueError(f"{source}: no row could be indexed (no decodable image)")
    dim = pq.read_schema(files[0], filesystem=fs).field("image_emb").type.list_size
    embs = {m: np.lib.format.open_memmap(os.path.join(out, store.embeddings_file(m) + ".tmp"),
                                         mode="w+", dtype=np.float32, shape=(n, dim))
            for m in store.MODALITIES}
    meta_w = thumb_w = None
    start = 0
    for f in files:
        t = pq.read_table(f, filesystem=fs)
        if t.num_rows == 0:
            continue
        stop = start + t.num_rows
        for m in store.MODALITIES:
            col = t.column(f"{m}_emb").combine_chunks()
            embs[m][start:stop] = col.values.to_numpy().reshape(-1, dim)
        ids = pa.array(np.arange(start, stop, dtype=np.int64))
        meta = t.drop_columns([c for c in ("image_emb", "text_emb", "thumb") if c in t.column_names])
        meta = meta.add_column(0, "id", ids)
        meta_w = meta_w or pq.ParquetWriter(os.path.join(out, "metadata.parquet"), meta.schema)
        meta_w.write_table(meta)
        if "thumb" in t.column_names:
            th = pa.table({"id": ids, "thumb": t.column("thumb")})
            thumb_w = thumb_w or pq.ParquetWriter(os.path.join(out, "thumbs.parquet"), th.schema)
            thumb_w.write_table(th)
        start = stop
    for w in (meta_w, thumb_w):
        if w is not None:
            w.close()
    for m in list(embs):
        embs.pop(m).flush()
        os.replace(os.path.join(out, store.embeddings_file(m) + ".tmp"),
                   os.path.join(out, store.embeddings_file(m)))
    return {"format": store.FORMAT, "count": n, "dim": dim, "modalities": list(store.MODALITIES),
            "dropped": rows_in - n, "model": model, "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _write_manifest(out: str, manifest: dict[str, Any]) -> None:
    tmp = os.path.join(out, store.META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(out, store.META_FILE))
