"""The ANN index ``align-ray index`` builds: chosen for its budget, recall measured and stored,
the stored setting used when serving, a request's own nprobe / ef applied."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from align_ray.serve import ann
from align_ray.serve.config import AnnConfig
from align_ray.serve.search import topk_exact
from tests.serve.conftest import clustered_pairs


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index_dir(tmp_path, n: int, dim: int, seed: int = 0) -> tuple[str, dict]:
    image, text = clustered_pairs(n, dim, seed)
    np.save(tmp_path / "image_embeddings.npy", image)
    np.save(tmp_path / "text_embeddings.npy", text)
    return str(tmp_path), {"format": 1, "count": n, "dim": dim, "modalities": ["image", "text"]}


@pytest.mark.parametrize("n, dim, cfg, expected", [
    (50_000, 256, AnnConfig(), None),                                    # below exact_below
    (1_000_000, 256, AnnConfig(), "HNSW32"),                             # no budget
    (1_000_000, 256, AnnConfig(memory_budget_mb=1000), "HNSW32,SQfp16"),  # 1048 B/vector
    (1_000_000, 256, AnnConfig(memory_budget_mb=550), "HNSW32,SQ8"),      # 577 B/vector
    (1_000_000, 256, AnnConfig(memory_budget_mb=400), "IVF4096,SQ8"),     # 419 B: no HNSW links
    (1_000_000, 256, AnnConfig(memory_budget_mb=100), "IVF4096,PQ64x8"),  # 105 B/vector
    (1_000_000, 256, AnnConfig(kind="ivf", quantization="sq8"), "IVF4096,SQ8"),
    (1_000_000, 256, AnnConfig(kind="flat"), None),
    (30_000, 64, AnnConfig(exact_below=1000, kind="ivf"), "IVF512,Flat"),
])
def test_plan_follows_size_and_budget(n, dim, cfg, expected):
    assert ann.plan(n, dim, cfg) == expected


def test_plan_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="do not fit"):
        ann.plan(1_000_000, 256, AnnConfig(memory_budget_mb=5))


def _recall(index, queries: np.ndarray, emb: np.ndarray, k: int = 10, params=None) -> float:
    _, truth = topk_exact(emb, queries, k)
    _, found = index.search(queries, k, params=params)
    return ann.recall_at_k(found, truth)


def test_ivf_built_in_parallel_ray_tasks_reports_its_recall(ray_cluster, tmp_path):
    out, manifest = _index_dir(tmp_path, 20_000, 32)
    cfg = AnnConfig(kind="ivf", exact_below=1000, recall_queries=300, target_recall=0.95)
    section = ann.build(out, manifest, cfg, parts=2)
    assert section["kind"] == "IVF512,Flat"
    image = np.load(os.path.join(out, "image_embeddings.npy"))
    for m in ("image", "text"):
        s = section[m]
        assert s["recall_tuning"] >= 0.95 and 1 <= s["nprobe"] < 512
        assert (s["queries"], s["tuning_queries"]) == (150, 150)
        assert s["recall"] >= 0.9          # on the half the setting was not chosen on
    # the stored figure holds on fresh held-out queries: new captions of indexed images, searched
    # in the image index (text -> image retrieval)
    s = section["image"]
    index = ann.load(out, "image", section)
    rng = np.random.default_rng(1)
    rows = image[rng.choice(len(image), 300, replace=False)]
    fresh = _unit(rows + 0.25 * rng.standard_normal(rows.shape))
    assert _recall(index, fresh, image) >= s["recall"] - 0.05
    # a narrower search, as a request may ask for, costs recall
    assert _recall(index, fresh, image, params=ann.search_params(index, 1)) < s["recall"] - 0.1
    # adding in 2 Ray tasks + merge gives the index a single add gives
    single = ann._add(ann._train("IVF512,Flat", image, np.random.default_rng(cfg.seed)), image, 1)
    merged = ann.load(out, "image", section)
    ann.set_param(single, section["image"]["nprobe"])
    q = image[:50]
    assert np.array_equal(single.search(q, 10)[1], merged.search(q, 10)[1])


def test_hnsw_tuned_and_served_through_the_store(tmp_path):
    from align_ray.serve.store import IndexStore

    out, manifest = _index_dir(tmp_path, 6000, 32, seed=3)
    cfg = AnnConfig(kind="hnsw", exact_below=1000, recall_queries=200, target_recall=0.97)
    manifest["ann"] = ann.build(out, manifest, cfg)
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": np.arange(6000), "text": [f"t{i}" for i in range(6000)]}),
                   tmp_path / "metadata.parquet")
    assert manifest["ann"]["kind"] == "HNSW32" and manifest["ann"]["image"]["recall_tuning"] >= 0.97

    store = IndexStore(out)                                   # backend "auto"
    info = store.search_info()
    assert info["image"] == {"kind": "HNSW32", "ef": manifest["ann"]["image"]["ef"],
                             "recall": manifest["ann"]["image"]["recall"], "recall_at": 10}
    text = np.load(tmp_path / "text_embeddings.npy")
    hits = store.search_many([(text[i], "image", 10, False) for i in range(20)])
    _, truth = topk_exact(np.load(tmp_path / "image_embeddings.npy"), text[:20], 10)
    assert ann.recall_at_k(np.array([[h["id"] for h in hs] for hs in hits]), truth) >= 0.9
    # a request's own ef reaches faiss: a wide one finds (nearly) the exact top 10, a narrow one less
    def recall_with(ef):
        got = store.search_many([(text[i], "image", 10, False, (None, ef)) for i in range(20)])
        return ann.recall_at_k(np.array([[h["id"] for h in hs] for hs in got]), truth)

    assert recall_with(1024) >= 0.99
    assert recall_with(10) < recall_with(1024)
    exact = IndexStore(out, backend="exact")
    assert exact.search_info()["image"] == {"kind": "exact"}


def test_small_index_stays_exact(index_dir):
    """The serve fixtures' 48-row index is far below exact_below: no ANN file, recall 1."""
    manifest = json.loads(open(os.path.join(index_dir, "index.json")).read())
    assert manifest["ann"] == {"kind": "flat", "recall_at_k": 1.0}
    assert not os.path.exists(os.path.join(index_dir, "image.faiss"))


def test_an_index_on_s3_is_served_with_its_ann_files(tmp_path, s3):
    """An index dir on S3 is copied to local disk for serving: the ANN files its manifest names
    come with it, so the store serves the tuned index, as from a local dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from align_ray import storage
    from align_ray.serve.store import IndexStore

    out, manifest = _index_dir(tmp_path, 2000, 16, seed=4)
    manifest["ann"] = ann.build(out, manifest, AnnConfig(kind="hnsw", exact_below=1000,
                                                         recall_queries=100))
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    pq.write_table(pa.table({"id": np.arange(2000)}), tmp_path / "metadata.parquet")
    s3.create_bucket(Bucket="ann-index")
    fs, base = storage.filesystem("s3://ann-index/idx")
    for f in tmp_path.iterdir():
        storage.write_bytes(fs, storage.join(base, f.name), f.read_bytes())
    assert "image.faiss" in {f.name for f in tmp_path.iterdir()}

    remote, local = IndexStore("s3://ann-index/idx"), IndexStore(out)
    assert remote.search_info() == local.search_info()
    assert remote.search_info()["image"]["kind"] == "HNSW32"
    q = np.load(tmp_path / "text_embeddings.npy")[:5]
    assert remote.search_many([(v, "image", 10, False) for v in q]) == \
        local.search_many([(v, "image", 10, False) for v in q])


def test_a_latency_budget_caps_the_tuned_setting(tmp_path):
    """``max_query_ms``: a budget no setting meets keeps the narrowest one, with the recall it
    gives and the miss recorded; an ample budget changes nothing but the record."""
    out, manifest = _index_dir(tmp_path, 20_000, 32, seed=5)
    image, text = (np.load(tmp_path / f"{m}_embeddings.npy") for m in ("image", "text"))
    index = ann._add(ann._train("IVF256,Flat", image, np.random.default_rng(0)), image, 1)
    _, truth = topk_exact(image, text[:200], 10)

    free = ann.tune(index, text[:200], truth, 0.95)
    ample = ann.tune(index, text[:200], truth, 0.95, max_query_ms=1e6)
    assert ample["nprobe"] == free["nprobe"] > 1 and ample["recall"] == free["recall"] >= 0.95
    assert ample["within_latency_budget"] and ample["max_query_ms"] == 1e6
    none = ann.tune(index, text[:200], truth, 0.95, max_query_ms=1e-9)
    assert none["nprobe"] == 1 and none["recall"] < 0.95
    assert none["within_latency_budget"] is False and "max_query_ms" not in free
    with pytest.raises(ValueError, match="max_query_ms"):
        AnnConfig(max_query_ms=-1)


@pytest.mark.parametrize("kind, quantization, n, dim, spec", [
    ("hnsw", "none", 4000, 32, "HNSW32"), ("hnsw", "fp16", 4000, 32, "HNSW32,SQfp16"),
    ("hnsw", "sq8", 4000, 32, "HNSW32,SQ8"), ("ivf", "sq8", 4000, 32, "IVF256,SQ8"),
    ("ivf", "pq", 2000, 16, "IVF128,PQ4x8"),       # PQ's k-means is the slow one: a smaller case
])
def test_each_code_is_built_searched_and_served_memory_mapped(tmp_path, kind, quantization, n,
                                                              dim, spec):
    """Every index kind and code ``plan`` can choose is built, reports its recall, is smaller in
    proportion to its code, and is served from the mapped file (the replicas on a node share its
    pages) with the results of the same index read into RAM."""
    out, manifest = _index_dir(tmp_path, n, dim, seed=6)
    cfg = AnnConfig(kind=kind, quantization=quantization, exact_below=1, recall_queries=200)
    section = ann.build(out, manifest, cfg)
    assert section["kind"] == spec
    assert not getattr(ann._empty(spec, dim), "do_polysemous_training", False)
    s = section["image"]
    assert 0 < s["recall"] <= 1 and s["queries"] == 100 and s["bytes"] > 0
    if "PQ" not in spec:               # 4 bytes for 16 dimensions: recall is what it is
        assert s["recall"] >= 0.85, s
    code = ann._code_bytes(spec.split(",")[1] if "," in spec else "Flat", dim)
    links = ann.HNSW_LINK_BYTES if kind == "hnsw" else 8
    assert s["bytes"] < n * (code + links) * 1.25 + 256 * dim * 4 + 65536, (s["bytes"], code)

    mapped = ann.load(out, "image", section)
    in_ram = ann.load(out, "image", section, mmap=False)
    path = os.path.join(out, s["file"])
    maps = open("/proc/self/maps").read()
    assert path in maps, f"{spec} is not memory-mapped"
    q = np.load(os.path.join(out, "text_embeddings.npy"))[:50]
    assert np.array_equal(mapped.search(q, 10)[1], in_ram.search(q, 10)[1])


def test_a_request_s_nprobe_or_ef_reaches_the_served_index_over_http(serve_app, ann_indexes):
    """``/v1/search`` and ``/knn-service`` on the app's ANN indexes (conftest ``ann_indexes``):
    ``/healthz`` reports each stored setting; a request's own ``ef`` (HNSW) or ``nprobe`` (IVF)
    is what faiss searches with: the hits equal the store's at that setting, a wide one finds
    the exact top 10, a narrow one loses recall; the knob an index does not have is ignored."""
    import requests

    from align_ray.serve.store import IndexStore

    client, _ = serve_app
    health = client.request("GET", "/healthz").json()["indexes"]
    for name, knob, other, narrow, wide in (("hnsw", "ef", "nprobe", 10, 2048),
                                            ("ivf", "nprobe", "ef", 1, 65536)):
        path = ann_indexes[name]
        stored = json.load(open(os.path.join(path, "index.json")))["ann"]["image"]
        assert health[name]["search"]["image"][knob] == stored[knob]
        store = IndexStore(path)
        queries = np.load(os.path.join(path, "text_embeddings.npy"))[-30:]
        _, truth = topk_exact(np.load(os.path.join(path, "image_embeddings.npy")), queries, 10)

        def served(value, route="/v1/search", extra=None):
            found = []
            for q in queries:
                body = ({"embedding": q.tolist(), "modality": "image", "k": 10, "index": name}
                        if route == "/v1/search" else
                        {"embedding_input": q.tolist(), "modality": "image", "num_images": 10,
                         "indice_name": name, "deduplicate": False})
                r = requests.post(client.base_url + route, json={**body, knob: value, **(extra or {})},
                                  timeout=60)
                assert r.status_code == 200, r.text
                rows = r.json()["results"] if route == "/v1/search" else r.json()
                found.append([h["id"] for h in rows])
            return found           # ragged: a narrow IVF probe may find fewer than 10

        def local(value):
            hits = store.search_many([(q, "image", 10, False, (value, None) if knob == "nprobe"
                                       else (None, value)) for q in queries])
            return [[h["id"] for h in hs] for hs in hits]

        got_narrow, got_wide = served(narrow), served(wide)
        assert got_narrow == local(narrow) and got_wide == local(wide)
        assert ann.recall_at_k(got_wide, truth) >= 0.99, name
        assert ann.recall_at_k(got_narrow, truth) < ann.recall_at_k(got_wide, truth) - 0.05, name
        assert served(narrow, "/knn-service") == got_narrow
        assert served(narrow, extra={other: 4096}) == got_narrow             # ignored


def test_auto_falls_back_to_ivf_when_hnsw_misses_the_target(tmp_path):
    """``auto``'s HNSW that cannot reach the target within ``max_ef`` (here 16, so that a small
    corpus shows it) is replaced by the IVF index that reaches it, per modality: on this corpus
    the image index (searched by noisy captions) needs the fallback, the text index (searched by
    the images themselves) does not.  ``index.json`` names each modality's kind and keeps the
    HNSW figures; the store serves each index with its own kind."""
    from align_ray.serve.store import IndexStore

    out, manifest = _index_dir(tmp_path, 6000, 32, seed=7)
    cfg = AnnConfig(exact_below=1000, recall_queries=200, target_recall=0.99, max_ef=16)
    manifest["ann"] = section = ann.build(out, manifest, cfg)
    image, text = section["image"], section["text"]
    assert image["kind"].startswith("IVF") and image["recall_tuning"] >= 0.99, image
    assert image["instead_of"]["kind"] == "HNSW32" and image["instead_of"]["ef"] == 16
    assert image["instead_of"]["recall_tuning"] < 0.99
    assert text["kind"] == "HNSW32" and text["recall_tuning"] >= 0.99 and "instead_of" not in text
    assert section["kind"] == "mixed"
    (tmp_path / "index.json").write_text(json.dumps(manifest))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": np.arange(6000)}), tmp_path / "metadata.parquet")
    info = IndexStore(out).search_info()
    assert info["image"]["kind"] == image["kind"] and info["image"]["nprobe"] == image["nprobe"]
    assert info["text"]["kind"] == "HNSW32" and info["text"]["ef"] == 16
    # forced HNSW is kept as asked, whatever its recall
    forced = ann.build(out, manifest, AnnConfig(kind="hnsw", exact_below=1000, recall_queries=200,
                                                target_recall=0.99, max_ef=16))
    assert forced["image"]["kind"] == "HNSW32" and forced["image"]["recall_tuning"] < 0.99
    assert "fallback_tried" not in forced["image"] and "instead_of" not in forced["image"]


def test_auto_keeps_hnsw_when_the_ivf_fallback_does_no_better(tmp_path):
    """The other branch: HNSW misses the target, the IVF fallback is built and tuned, and it
    does worse, so HNSW stays and ``fallback_tried`` records what the IVF index reached.  A
    latency budget no setting can meet holds each kind to its narrowest setting (efSearch 16,
    nprobe 1), and on vectors spread evenly over the sphere one probed list of 256 finds far
    fewer true neighbours than a 16-wide graph search."""
    rng = np.random.default_rng(3)
    for m in ("image", "text"):
        v = rng.standard_normal((6000, 32)).astype(np.float32)
        np.save(tmp_path / f"{m}_embeddings.npy", v / np.linalg.norm(v, axis=1, keepdims=True))
    manifest = {"format": 1, "count": 6000, "dim": 32, "modalities": ["image", "text"]}
    cfg = AnnConfig(exact_below=1000, recall_queries=200, target_recall=0.99, max_ef=16,
                    max_query_ms=1e-6)
    section = ann.build(str(tmp_path), manifest, cfg)
    for m in ("image", "text"):
        entry = section[m]
        assert entry["kind"] == "HNSW32" and entry["ef"] == 16 and "instead_of" not in entry
        tried = entry["fallback_tried"]
        assert tried["kind"] == "IVF256,Flat" and tried["nprobe"] == 1, tried
        assert tried["recall_tuning"] < entry["recall_tuning"] < 0.99, (tried, entry)
        assert entry["within_latency_budget"] is False
    assert section["kind"] == "HNSW32"
