"""An index directory on disk, and the searchable object the Router holds.

Layout (written by :mod:`align_ray.serve.index`)::

    INDEX_DIR/index.json              {"format": 1, "count": N, "dim": D, "modalities": [...], ...}
    INDEX_DIR/image_embeddings.npy    float32 [N, D], unit rows; row i = id i
    INDEX_DIR/text_embeddings.npy     float32 [N, D], unit rows
    INDEX_DIR/metadata.parquet        id, key, text, url, phash (uint64), text_hash (uint64), ...
    INDEX_DIR/thumbs.parquet          id, thumb (JPEG bytes, <= 256 px), for the web page
    INDEX_DIR/shards/*.parquet        the Ray Data output these were assembled from

``INDEX_DIR`` may be an ``s3://`` URI for serving (copied locally at start); ``align-ray index``
writes to a local directory.  Both indexes share ids (row i of each is corpus pair i), so an image hit carries its caption and a
caption hit its image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from align_ray import storage
from align_ray.serve.search import VectorIndex, dedup_hits

FORMAT = 1
MODALITIES = ("image", "text")
META_FILE = "index.json"
# columns returned with every hit (when present), besides id and score
RESULT_COLUMNS = ("key", "text", "url", "width", "height", "sha256")


def embeddings_file(modality: str) -> str:
    return f"{modality}_embeddings.npy"


def read_manifest(index_dir: str) -> dict[str, Any]:
    fs, base = storage.filesystem(index_dir)
    path = storage.join(base, META_FILE)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{index_dir}: not an index directory (no {META_FILE})")
    meta = json.loads(storage.read_bytes(fs, path))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{index_dir}: unsupported index format {meta.get('format')!r}")
    return meta


def localize(index_dir: str, manifest: dict[str, Any] | None = None, ann: bool = True,
             extra: tuple[str, ...] | list[str] = ()) -> str:
    """An ``s3://`` index is copied to a local temp dir once (memory-mapped from there), with
    the ANN index files its manifest's ``ann`` section names unless ``ann=False`` (a caller that
    searches the vectors themselves), and the ``extra`` files (an index shard's own)."""
    if "://" not in index_dir:
        return index_dir
    section = ((manifest or read_manifest(index_dir)).get("ann") or {}) if ann else {}
    ann_files = [section[m]["file"] for m in MODALITIES
                 if isinstance(section.get(m), dict) and section[m].get("file")] + list(extra)
    fs, base = storage.filesystem(index_dir)
    local = tempfile.mkdtemp(prefix="align-index-")
    for name in (META_FILE, "metadata.parquet", "thumbs.parquet",
                 *(embeddings_file(m) for m in MODALITIES), *ann_files):
        src = storage.join(base, name)
        if storage.exists(fs, src):
            with fs.open_input_stream(src) as f_in, open(os.path.join(local, name), "wb") as f_out:
                shutil.copyfileobj(f_in, f_out, 8 << 20)
    return local


class IndexStore:
    """Both modalities' vector indexes + metadata + thumbnails, loaded from an index dir."""

    def __init__(self, index_dir: str, backend: str = "auto", faiss_factory: str = "Flat",
                 dedup_hamming: int = 6, mmap: bool = True, vectors: bool = True):
        """``backend``: ``auto`` = the tuned ANN index the index dir holds (memory-mapped, with
        its stored nprobe / efSearch), else exact; ``exact``; ``faiss`` = built at load from
        ``faiss_factory``.  ``vectors=False``: metadata only (a sharded Router: the
        ``IndexShard`` deployments hold the vectors, :mod:`align_ray.serve.shards`)."""
        self.dir = index_dir
        self.manifest = read_manifest(index_dir)
        index_dir = localize(index_dir, self.manifest)
        self.dim = int(self.manifest["dim"])
        self.dedup_hamming = dedup_hamming
        self.indexes: dict[str, VectorIndex] = {}
        section = self.manifest.get("ann") or {}
        for m in self.manifest["modalities"] if vectors else ():
            emb = np.load(os.path.join(index_dir, embeddings_file(m)),
                          mmap_mode="r" if mmap and backend != "faiss" else None)
            if emb.shape != (self.manifest["count"], self.dim):
                raise ValueError(f"{index_dir}: {m} embeddings have shape {emb.shape}, manifest "
                                 f"says {(self.manifest['count'], self.dim)}")
            prebuilt = None
            if backend == "auto" and m in section:
                from align_ray.serve import ann

                prebuilt = ann.load(index_dir, m, section, mmap=mmap)
            kind = backend if backend != "auto" else ("faiss" if prebuilt is not None else "exact")
            self.indexes[m] = VectorIndex(emb, kind, faiss_factory, prebuilt=prebuilt)
        meta = pq.read_table(os.path.join(index_dir, "metadata.parquet"))
        self.columns = {c: meta.column(c).to_numpy(zero_copy_only=False) for c in meta.column_names}
        self._phash = self.columns.get("phash")
        self._text_hash = self.columns.get("text_hash")
        self._thumbs: pa.ChunkedArray | None = None
        thumbs = os.path.join(index_dir, "thumbs.parquet")
        if os.path.exists(thumbs):
            self._thumbs = pq.read_table(thumbs, memory_map=True).column("thumb")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.manifest["modalities"])

    def search(self, query: np.ndarray, modality: str, k: int, dedup: bool = False) -> list[dict]:
        """Best ``k`` hits of one query vector in the ``modality`` index, as result dicts."""
        return self.search_many([(query, modality, k, dedup)])[0]

    def search_many(self, queries: list[tuple]) -> list[list[dict]]:
        """Several ``(vector, modality, k, dedup[, (nprobe, ef)])`` queries; those on the same
        index with the same knobs share one pass over it (one matrix product instead of one
        scan per query)."""
        out: list[list[dict] | None] = [None] * len(queries)
        groups = {(q[1], tuple(q[4]) if len(q) > 4 else (None, None)) for q in queries}
        for modality, knobs in groups:
            if modality not in self.indexes:
                raise KeyError(f"no {modality} index in {self.dir}")
            index = self.indexes[modality]
            pos = [i for i, q in enumerate(queries)
                   if q[1] == modality and (tuple(q[4]) if len(q) > 4 else (None, None)) == knobs]
            fetch = max(self.fetch_size(queries[i][2], queries[i][3], len(index)) for i in pos)
            scores, ids = index.search(np.stack([queries[i][0] for i in pos]), fetch, knobs)
            for row, i in enumerate(pos):
                k, dedup = queries[i][2], queries[i][3]
                hits = self.finish(scores[row], ids[row], modality, k, dedup)
                if len(hits) < k and fetch < len(index):   # dedup ate too many: widen alone
                    hits = self._search_one(queries[i][0], modality, k, dedup, fetch * 4, knobs)
                out[i] = hits
        return out  # type: ignore[return-value]

    @staticmethod
    def fetch_size(k: int, dedup: bool, n: int) -> int:
        return min(n, max(4 * k, k + 16)) if dedup else min(n, k)

    def _search_one(self, query, modality: str, k: int, dedup: bool, fetch: int,
                    knobs: tuple = (None, None)) -> list[dict]:
        index = self.indexes[modality]
        while True:
            fetch = min(fetch, len(index))
            scores, ids = index.search(query, fetch, knobs)
            hits = self.finish(scores[0], ids[0], modality, k, dedup)
            if len(hits) >= k or fetch >= len(index):
                return hits
            fetch *= 4

    def finish(self, scores: np.ndarray, ids: np.ndarray, modality: str, k: int,
                dedup: bool) -> list[dict]:
        valid = ids >= 0                      # faiss pads with -1 when it finds fewer
        scores, ids = scores[valid], ids[valid]
        if dedup:
            keep = dedup_hits(ids, phash=self._phash if modality == "image" else None,
                              text_hash=self._text_hash if modality == "text" else None,
                              max_hamming=self.dedup_hamming)
            scores, ids = scores[keep], ids[keep]
        return [self.record(int(i), float(s)) for s, i in zip(scores[:k], ids[:k])]

    def record(self, i: int, score: float) -> dict[str, Any]:
        out: dict[str, Any] = {"id": i, "score": score}
        for c in RESULT_COLUMNS:
            col = self.columns.get(c)
            if col is not None:
                v = col[i]
                out[c] = v.item() if hasattr(v, "item") else v
        out.setdefault("text", None)
        out.setdefault("url", None)
        return out

    def search_info(self) -> dict[str, Any]:
        """Per modality: exact, or the ANN index with its stored setting and measured recall."""
        section = self.manifest.get("ann") or {}
        out: dict[str, Any] = {}
        for m, index in self.indexes.items():
            if index.approximate and m in section:
                out[m] = {"kind": section[m].get("kind", section["kind"]),
                          **{k: section[m][k] for k in ("nprobe", "ef", "recall") if k in section[m]},
                          "recall_at": section.get("k")}
            else:
                out[m] = {"kind": "faiss" if index.approximate else "exact"}
        return out

    @property
    def has_thumbnails(self) -> bool:
        return self._thumbs is not None

    def thumbnail(self, i: int) -> bytes | None:
        if self._thumbs is None or not 0 <= i < len(self):
            return None
        v = self._thumbs[i].as_py()
        return v or None
