"""The index build (Ray Data batch inference) and the IndexStore the Router searches."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.serve.config import AnnConfig, IndexConfig
from align_ray.serve.index import resolve_input
from align_ray.serve.search import hamming64
from align_ray.serve.store import IndexStore
from tests.serve.conftest import DUP_IMAGES, DUP_TEXTS, N_BASE


def test_index_layout_order_and_dropped_row(index_dir, corpus):
    manifest = json.load(open(os.path.join(index_dir, "index.json")))
    good = corpus["rows"][:-1]                        # the last row's image is not an image
    assert manifest["count"] == len(good) and manifest["dropped"] == 1 and manifest["dim"] == 128
    meta = pq.read_table(os.path.join(index_dir, "metadata.parquet"))
    assert meta.column("id").to_pylist() == list(range(len(good)))
    assert meta.column("text").to_pylist() == [r["text"] for r in good]   # corpus order kept
    assert meta.column("url").to_pylist() == [r["url"] for r in good]
    assert pa.types.is_uint64(meta.schema.field("phash").type)
    thumbs = pq.read_table(os.path.join(index_dir, "thumbs.parquet"))
    assert all(t[:3] == b"\xff\xd8\xff" for t in thumbs.column("thumb").to_pylist())


def test_index_embeddings_match_the_model(index_dir, corpus, embedder):
    good = corpus["rows"][:-1]
    img = np.load(os.path.join(index_dir, "image_embeddings.npy"))
    txt = np.load(os.path.join(index_dir, "text_embeddings.npy"))
    np.testing.assert_allclose(img, embedder.embed_images([r["image"] for r in good]), atol=1e-4)
    np.testing.assert_allclose(txt, embedder.embed_texts([r["text"] for r in good]), atol=1e-4)


def test_planted_duplicates_carry_matching_hashes(index_dir):
    meta = pq.read_table(os.path.join(index_dir, "metadata.parquet"))
    phash = meta.column("phash").to_numpy()
    text_hash = meta.column("text_hash").to_numpy()
    for j, src in enumerate(DUP_IMAGES):
        assert hamming64(phash[[src]], int(phash[N_BASE + j]))[0] <= 6
    for j, src in enumerate(DUP_TEXTS):   # upper-cased + trailing spaces: same normalised text
        assert text_hash[src] == text_hash[N_BASE + len(DUP_IMAGES) + j]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_store_exact_and_faiss_agree(index_dir, factory):
    pytest.importorskip("faiss")
    exact = IndexStore(index_dir)
    approx = IndexStore(index_dir, backend="faiss", faiss_factory=factory)
    q = np.load(os.path.join(index_dir, "text_embeddings.npy"))[:10]
    for modality in ("image", "text"):
        for v in q:
            a, b = exact.search(v, modality, 5), approx.search(v, modality, 5)
            np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)
            for x, y in zip(a, b):   # same ids, except that equal scores (duplicate texts) may swap
                assert x["id"] == y["id"] or abs(x["score"] - y["score"]) < 1e-5


def test_search_many_equals_one_by_one(index_dir):
    store = IndexStore(index_dir)
    img = np.load(os.path.join(index_dir, "image_embeddings.npy"))
    queries = [(img[i], m, k, d) for i, (m, k, d) in enumerate(
        [("image", 3, False), ("text", 5, True), ("image", 7, True), ("text", 1, False)])]
    together = store.search_many(queries)
    for q, hits in zip(queries, together):
        alone = store.search(*q)
        assert [h["id"] for h in hits] == [h["id"] for h in alone]
        assert len(hits) == q[2]


def test_store_dedup_keeps_k_and_drops_copies(index_dir):
    store = IndexStore(index_dir)
    img = np.load(os.path.join(index_dir, "image_embeddings.npy"))
    src = DUP_IMAGES[0]
    plain = [h["id"] for h in store.search(img[src], "image", 5)]
    assert plain[:2] == [src, N_BASE]                     # the image, then its re-encoded copy
    dedup = [h["id"] for h in store.search(img[src], "image", 5, dedup=True)]
    assert len(dedup) == 5 and dedup[0] == src and N_BASE not in dedup
    txt = np.load(os.path.join(index_dir, "text_embeddings.npy"))
    tsrc, tcopy = DUP_TEXTS[0], N_BASE + len(DUP_IMAGES)
    dedup = [h["id"] for h in store.search(txt[tsrc], "text", 5, dedup=True)]
    assert len(dedup) == 5 and not {tsrc, tcopy} <= set(dedup)
    every = [h["id"] for h in store.search(txt[tsrc], "text", len(store), dedup=True)]
    assert len(every) == len(store) - len(DUP_TEXTS)     # exactly the equal-text copies go


def test_store_loads_from_s3(index_dir, s3):
    from align_ray import storage

    s3.create_bucket(Bucket="serve-index")
    fs, base = storage.filesystem("s3://serve-index/idx")
    for name in os.listdir(index_dir):
        if os.path.isfile(os.path.join(index_dir, name)):
            storage.write_bytes(fs, storage.join(base, name), open(os.path.join(index_dir, name), "rb").read())
    remote, local = IndexStore("s3://serve-index/idx"), IndexStore(index_dir)
    q = np.load(os.path.join(index_dir, "image_embeddings.npy"))[5]
    assert remote.search(q, "image", 4) == local.search(q, "image", 4)
    assert remote.thumbnail(5) == local.thumbnail(5)


def test_build_writes_to_s3_from_a_model_on_s3(ray_cluster, tiny_model, corpus, index_dir, s3):
    """``align-ray index`` with model and output on S3: the actors load the model from S3 and write
    their shards there; the finished index equals the local build.  Its ANN index is forced (the
    corpus is far below ``exact_below``): the build writes it and its manifest section to S3, and
    the store serves it from there."""
    from align_ray import storage
    from align_ray.serve import index

    s3.create_bucket(Bucket="index-out")
    fs, base = storage.filesystem("s3://index-out/model")
    for name in os.listdir(tiny_model):
        storage.write_bytes(fs, storage.join(base, name), open(os.path.join(tiny_model, name), "rb").read())
    uri = "s3://index-out/runs/idx"
    ann = AnnConfig(kind="hnsw", exact_below=1, recall_queries=40, k=5)
    manifest = index.build(IndexConfig(model="s3://index-out/model", data=corpus["path"], output=uri,
                                       batch_size=16, concurrency=1, num_cpus=0.5, thumb_size=64,
                                       ann=ann))
    assert manifest["model"] == "s3://index-out/model"
    assert manifest["ann"]["kind"] == "HNSW32" and manifest["ann"]["text"]["recall"] >= 0.9
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="index-out", Prefix="runs/idx/")["Contents"]}
    assert {"runs/idx/index.json", "runs/idx/image_embeddings.npy", "runs/idx/metadata.parquet",
            "runs/idx/thumbs.parquet", "runs/idx/image.faiss", "runs/idx/text.faiss"} <= keys
    remote, local = IndexStore(uri, backend="exact"), IndexStore(index_dir)
    assert local.search_info()["text"] == {"kind": "exact"}
    assert len(remote) == len(local) == manifest["count"]
    q = np.load(os.path.join(index_dir, "text_embeddings.npy"))[3]
    assert [h["id"] for h in remote.search(q, "text", 5)] == [h["id"] for h in local.search(q, "text", 5)]
    served = IndexStore(uri)                           # backend "auto": the ANN files, from S3
    assert served.search_info()["text"]["kind"] == "HNSW32"
    assert served.search(q, "text", 1)[0]["id"] == 3   # the vector itself
    with pytest.raises(FileExistsError):   # a finished index is not overwritten unless asked
        index.build(IndexConfig(model="s3://index-out/model", data=corpus["path"], output=uri))


def test_resolve_input_stage_layout_and_errors(tmp_path):
    stage = tmp_path / "stage" / "parquet"
    stage.mkdir(parents=True)
    pq.write_table(pa.table({"key": ["0"], "url": ["u"], "text": ["t"], "jpg": [b"x"],
                             "phash": pa.array([1], pa.uint64()),
                             "text_hash": pa.array([2], pa.uint64())}), stage / "s0.parquet")
    files, _, image_col, extra = resolve_input(IndexConfig(data=str(tmp_path / "stage")))
    assert files[0].endswith("s0.parquet") and image_col == "jpg"
    assert extra == ["key", "url", "phash", "text_hash"]
    with pytest.raises(ValueError, match="caption"):
        resolve_input(IndexConfig(data=str(tmp_path / "stage"), text_col="caption"))
    with pytest.raises(FileNotFoundError):
        resolve_input(IndexConfig(data=str(tmp_path / "nothing")))


def test_cli_index_errors_exit_2_before_ray(tmp_path, capsys):
    from align_ray.cli import main

    assert main(["index", "--model", "m", "--data", str(tmp_path), "--output", "o"]) == 2
    assert "no parquet files" in capsys.readouterr().err
    assert main(["index", "--data", str(tmp_path)]) == 2
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a saved model" in capsys.readouterr().err


@pytest.mark.parametrize("free, cfg, expect", [
    ({"CPU": 2}, {}, (1, 1.0)),                  # one CPU left for the reads/writes feeding the pool
    ({"CPU": 1.7}, {}, (1, 0.7)),                # next to a Serve app: a fractional actor
    ({"CPU": 1}, {}, (1, 0.5)),
    ({"CPU": 0}, {}, (1, 1.0)),                  # nothing free yet (autoscaling): as configured
    ({"CPU": 8}, {}, (7, 1.0)),
    ({"CPU": 8}, {"num_cpus": 2}, (3, 2.0)),
    ({"CPU": 8}, {"concurrency": 5}, (5, 1.0)),  # an explicit size wins
    ({"CPU": 16, "GPU": 2}, {"num_gpus": 1, "num_cpus": 1}, (2, 1.0)),
    ({"CPU": 16, "GPU": 1}, {"num_gpus": 0.25, "num_cpus": 1}, (4, 1.0)),
])
def test_pool_size_leaves_room_for_the_tasks_that_feed_it(free, cfg, expect):
    from align_ray.serve.index import pool_size

    assert pool_size(IndexConfig(model="m", data="d", output="o", **cfg), free) == expect


def test_build_with_ann_shards_on_s3_each_shard_fetches_its_own_file(ray_cluster, tiny_model,
                                                                      corpus, s3):
    """``ann.shards: 2``: ``align-ray index`` writes per-shard ANN files and an ``ann_shards``
    section instead of the whole-index ANN; an ``IndexShard`` of a 2-shard app copies only its
    own files from S3 and searches them; an unsharded store searches exactly."""
    from align_ray.serve import ann_shards, index, store
    from align_ray.serve.shards import ShardIndex

    s3.create_bucket(Bucket="index-shards")
    uri = "s3://index-shards/idx"
    ann = AnnConfig(kind="hnsw", exact_below=1, recall_queries=40, k=5, shards=2)
    manifest = index.build(IndexConfig(model=tiny_model, data=corpus["path"], output=uri,
                                       batch_size=16, concurrency=1, num_cpus=0.5,
                                       thumbnails=False, ann=ann))
    section = manifest["ann_shards"]
    assert manifest["ann"] == {"kind": "flat", "recall_at_k": 1.0}
    assert section["kind"] == "HNSW32" and section["shards"] == 2
    assert section["text"]["recall"] >= 0.9
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="index-shards", Prefix="idx/")["Contents"]}
    assert {f"idx/{m}.shard{s}of2.faiss" for m in ("image", "text") for s in (0, 1)} <= keys
    assert "idx/image.faiss" not in keys
    shard = ShardIndex(uri, 1, 2)
    assert shard.indexes["text"].approximate
    local = store.localize(uri, manifest, ann=False, extra=ann_shards.files_of(manifest, 1))
    assert sorted(f for f in os.listdir(local) if f.endswith(".faiss")) == [
        "image.shard1of2.faiss", "text.shard1of2.faiss"]
    q = np.load(os.path.join(local, "text_embeddings.npy"))[shard.hi - 1]
    assert shard.search(q, "text", 1)[1][0, 0] == shard.hi - 1      # the vector itself
    assert not IndexStore(uri).indexes["text"].approximate
