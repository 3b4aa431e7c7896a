"""Per-shard ANN indexes (align_ray/serve/ann_shards.py): built and tuned on the merged result,
loaded by each ``IndexShard``'s ``ShardIndex`` at its stored setting, and not used by an app
with another shard count.  Over HTTP on a running sharded app: tests/serve/test_shards.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from align_ray.serve import ann, ann_shards
from align_ray.serve.config import AnnConfig
from align_ray.serve.search import topk_exact
from align_ray.serve.shards import ShardIndex, merge
from tests.serve.conftest import clustered_pairs

N, DIM, K = 6000, 32, 10


def _index_dir(path, seed: int = 4) -> tuple[str, dict]:
    image, text = clustered_pairs(N, DIM, seed)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "image_embeddings.npy", image)
    np.save(path / "text_embeddings.npy", text)
    return str(path), {"format": 1, "count": N, "dim": DIM, "modalities": ["image", "text"]}


def _write(path: str, manifest: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": np.arange(N)}), os.path.join(path, "metadata.parquet"))
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(manifest, f)


def _served(path: str, num_shards: int, queries: np.ndarray, modality: str,
            knobs: tuple = (None, None)) -> tuple[list[ShardIndex], np.ndarray]:
    """What the Router gets from ``num_shards`` shards: each ShardIndex's top k, merged."""
    shards = [ShardIndex(path, s, num_shards) for s in range(num_shards)]
    return shards, merge([s.search(queries, modality, K, knobs) for s in shards], K)[1]


@pytest.mark.parametrize("kind, knob", [("hnsw", "ef"), ("ivf", "nprobe")])
def test_per_shard_indexes_reach_the_target_on_the_merged_result(tmp_path, kind, knob):
    path, manifest = _index_dir(tmp_path / kind)
    cfg = AnnConfig(kind=kind, exact_below=1, recall_queries=300, target_recall=0.95, shards=2)
    section = ann_shards.build(path, manifest, cfg)
    assert section["shards"] == 2 and section["kind"].startswith(kind.upper())
    manifest[ann_shards.SECTION] = section
    manifest["ann"] = {"kind": "flat", "recall_at_k": 1.0}
    _write(path, manifest)
    rng = np.random.default_rng(11)
    for m, other in (("image", "text"), ("text", "image")):
        entry = section[m]
        assert entry["files"] == [f"{m}.shard0of2.faiss", f"{m}.shard1of2.faiss"]
        assert all(os.path.exists(os.path.join(path, f)) for f in entry["files"])
        assert entry["recall_tuning"] >= 0.95 and entry["recall"] >= 0.9, entry
        # each shard's index covers its own rows only, at the stored setting
        shards, got = _served(path, 2, np.load(os.path.join(path, f"{other}_embeddings.npy"))[
            rng.choice(N, 200, replace=False)], m)
        assert [s.indexes[m].approximate for s in shards] == [True, True]
        assert [len(s.indexes[m]) for s in shards] == [3000, 3000]
        for s in shards:
            assert ann.param_name(s.indexes[m]._faiss) == knob
            faiss_index = s.indexes[m]._faiss
            value = faiss_index.hnsw.efSearch if knob == "ef" else \
                ann._faiss().extract_index_ivf(faiss_index).nprobe
            assert value == entry[knob]
    # the merged answer's recall is what index.json says, within sampling noise
    queries = np.load(os.path.join(path, "text_embeddings.npy"))[rng.choice(N, 300, replace=False)]
    _, truth = topk_exact(np.load(os.path.join(path, "image_embeddings.npy")), queries, K)
    _, got = _served(path, 2, queries, "image")
    assert ann.recall_at_k(got, truth) >= section["image"]["recall"] - 0.05
    # a request's own knob reaches every shard: the widest setting finds the exact top k
    wide = (None, 4096) if knob == "ef" else (65536, None)
    assert ann.recall_at_k(_served(path, 2, queries, "image", wide)[1], truth) >= 0.99
    narrow = (None, K) if knob == "ef" else (1, None)
    assert ann.recall_at_k(_served(path, 2, queries, "image", narrow)[1], truth) < \
        ann.recall_at_k(got, truth)
    info = ann_shards.info(manifest, 2, "auto")
    assert info["image"]["kind"] == f"{section['kind']}, sharded"
    assert info["image"][knob] == section["image"][knob] and info["image"]["recall_at"] == K


def test_another_shard_count_searches_its_rows_exactly(tmp_path):
    path, manifest = _index_dir(tmp_path / "idx")
    manifest[ann_shards.SECTION] = ann_shards.build(
        path, manifest, AnnConfig(kind="hnsw", exact_below=1, recall_queries=100, shards=2))
    _write(path, manifest)
    queries = np.load(os.path.join(path, "text_embeddings.npy"))[:50]
    shards, got = _served(path, 3, queries, "image")
    assert not any(s.indexes["image"].approximate for s in shards)
    assert np.array_equal(got, topk_exact(np.load(os.path.join(path, "image_embeddings.npy")),
                                          queries, K)[1])
    assert ann_shards.info(manifest, 3, "auto")["image"] == {"kind": "exact, sharded"}
    # backend exact ignores the files too
    assert not ShardIndex(path, 0, 2, backend="exact").indexes["image"].approximate


def test_shards_below_exact_below_build_nothing(tmp_path):
    path, manifest = _index_dir(tmp_path / "small")
    # 6,000 rows are above exact_below, one shard's 3,000 are not: exact per shard
    assert ann_shards.build(path, manifest, AnnConfig(exact_below=4000, shards=2)) is None
    assert not [f for f in os.listdir(path) if f.endswith(".faiss")]
    # the memory budget is split between the shards: 0.5 MB over 6,000 vectors is 87 B each,
    # which fits fp16 codes (64 B + an 8-byte id) and not float32 ones (128 B); undivided,
    # one shard's 3,000 would get 175 B each and float32
    section = ann_shards.build(path, manifest, AnnConfig(exact_below=1, memory_budget_mb=0.5,
                                                         recall_queries=50, shards=2))
    assert section["kind"] == "IVF256,SQfp16"
