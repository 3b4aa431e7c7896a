"""Sharded serving, hot swap and named indexes, on a running app (issue 16, section 2).

One app, ``align-shard`` on ``/sharded``: the package's index as ``main`` and a 29-row slice of
it as ``small``, each split over 2 ``IndexShard`` deployments.  It is deployed the way
``serve deploy`` does (a declarative config, through the Serve controller), so that a later
config differing only in the Router's ``user_config`` is applied in place by ``reconfigure``
(an app deployed with ``serve.run`` gets a new code version on every run: its replicas would be
replaced instead).  The unsharded reference is the package's own app (``serve_app``).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from align_ray.serve.app import app_builder, wait_running
from align_ray.serve.search import topk_exact
from tests.serve.conftest import TEST_LIMITS

APP, PREFIX, SMALL_ROWS = "align-shard", "/sharded", 29


def _slice_index(src: str, dst: str, n: int) -> str:
    """The first ``n`` rows of an index dir, as an index dir of its own."""
    from align_ray.serve.store import META_FILE, embeddings_file

    os.makedirs(dst)
    meta = json.load(open(os.path.join(src, META_FILE)))
    for m in meta["modalities"]:
        np.save(os.path.join(dst, embeddings_file(m)), np.load(os.path.join(src, embeddings_file(m)))[:n])
    for name in ("metadata.parquet", "thumbs.parquet"):
        pq.write_table(pq.read_table(os.path.join(src, name)).slice(0, n), os.path.join(dst, name))
    meta.update(count=n)
    meta.pop("ann", None)
    json.dump(meta, open(os.path.join(dst, META_FILE), "w"))
    return dst


def _app_config(args: dict, router_user_config: dict | None = None):
    from ray.serve.schema import ServeDeploySchema

    app = {"name": APP, "route_prefix": PREFIX, "import_path": "align_ray.serve.app:app_builder",
           "args": args}
    if router_user_config is not None:
        app["deployments"] = [{"name": "Router", "user_config": router_user_config}]
    return ServeDeploySchema.model_validate({"applications": [app]})


def _deploy(config) -> None:
    """What ``serve deploy`` (the dashboard's PUT /api/serve/applications/) does with a config."""
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(config)


@pytest.fixture(scope="module")
def small_index(index_dir, tmp_path_factory) -> str:
    return _slice_index(index_dir, str(tmp_path_factory.mktemp("small") / "small"), SMALL_ROWS)


@pytest.fixture(scope="module")
def tuned_index(tmp_path_factory) -> str:
    """A synthetic index (conftest's ANN corpus) with per-shard HNSW indexes for 2 shards."""
    import pyarrow as pa

    from align_ray.serve import ann_shards
    from align_ray.serve.config import AnnConfig
    from tests.serve.conftest import ANN_DIM, ANN_ROWS, clustered_pairs

    out = tmp_path_factory.mktemp("tuned")
    image, text = clustered_pairs(ANN_ROWS, ANN_DIM, 9)
    np.save(out / "image_embeddings.npy", image)
    np.save(out / "text_embeddings.npy", text)
    pq.write_table(pa.table({"id": np.arange(ANN_ROWS), "text": [f"row {i}" for i in range(ANN_ROWS)]}),
                   out / "metadata.parquet")
    manifest = {"format": 1, "count": ANN_ROWS, "dim": ANN_DIM, "modalities": ["image", "text"],
                "ann": {"kind": "flat", "recall_at_k": 1.0}}
    manifest[ann_shards.SECTION] = ann_shards.build(
        str(out), manifest, AnnConfig(kind="hnsw", exact_below=1, recall_queries=200, shards=2))
    (out / "index.json").write_text(json.dumps(manifest))
    return str(out)


@pytest.fixture(scope="module")
def sharded(serve_app, tiny_model, index_dir, small_index, tuned_index):
    """(base URL of the sharded app, its args, base URL of the unsharded reference app)."""
    from ray import serve

    client, cfg = serve_app
    tiny = dict(min_replicas=1, max_replicas=1, num_cpus=0.05, max_batch_size=8,
                batch_wait_timeout_s=0.01, max_ongoing_requests=16, target_ongoing_requests=4)
    args = dict(model=tiny_model, index=index_dir, index_name="main",
                indexes={"small": small_index, "tuned": tuned_index},
                index_shards=2, index_shard=dict(min_replicas=1, max_replicas=2, num_cpus=0.05,
                                                 target_ongoing_requests=4, max_ongoing_requests=16),
                image_encoder=tiny, text_encoder=tiny, router={"num_cpus": 0.05},
                limits=TEST_LIMITS, app_name=APP)
    _deploy(_app_config(args))
    wait_running(APP, 180)
    try:
        yield f"http://{cfg.host}:{cfg.port}{PREFIX}", args, client.base_url
    finally:
        serve.delete(APP)


def _post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60)


def _hits(resp: requests.Response) -> list[tuple]:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    rows = data["results"] if isinstance(data, dict) else data
    return [(r["id"], r.get("score", r.get("similarity")), r.get("text", r.get("caption")))
            for r in rows]


def test_sharded_app_runs_two_shard_deployments(sharded):
    from ray import serve

    url, _, _ = sharded
    deployments = serve.status().applications[APP].deployments
    assert {"IndexShard0", "IndexShard1", "Router"} <= set(deployments)
    # each shard deployment is autoscaled on its own, with the configured bounds (Serve's record)
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][APP]["deployments"]
    for i in range(2):
        auto = details[f"IndexShard{i}"]["deployment_config"]["autoscaling_config"]
        assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == \
            (1, 2, 4), auto
    health = requests.get(url + "/healthz", timeout=30).json()
    assert health["index"]["shards"] == 2 and health["index"]["name"] == "main"
    assert health["index"]["search"]["image"]["kind"] == "exact, sharded"


def test_sharded_results_equal_the_single_index(sharded, corpus):
    url, _, ref = sharded
    rng = np.random.default_rng(7)
    image = base64.b64encode(corpus["rows"][3]["image"]).decode()
    queries = [{"text": corpus["rows"][7]["text"]}, {"image": image},
               {"embedding": rng.standard_normal(128).tolist()}]
    spans = set()
    for q in queries:
        for modality in ("image", "text"):
            for dedup in (False, True):
                for k in (5, 44):
                    body = {**q, "modality": modality, "dedup": dedup, "k": k}
                    got, want = _hits(_post(url, "/v1/search", body)), _hits(_post(ref, "/v1/search", body))
                    assert got == want, body
                    spans.update(i < 22 for i, _, _ in got)   # both shards' rows answered
                    if dedup:
                        assert len(got) < 44 or k < 44       # the planted duplicates were dropped
    assert spans == {True, False}
    for q in ({"text": corpus["rows"][7]["text"]}, {"embedding_input": rng.standard_normal(128).tolist()}):
        for dedup in (False, True):
            body = {**q, "modality": "text", "num_images": 10, "deduplicate": dedup}
            assert _hits(_post(url, "/knn-service", body)) == _hits(_post(ref, "/knn-service", body))


def test_named_indexes(sharded, small_index):
    from align_ray.serve.store import IndexStore

    url, _, _ = sharded
    assert requests.get(url + "/indices-list", timeout=30).json() == ["main", "small", "tuned"]
    vec = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    want = [(h["id"], h["score"], h["text"]) for h in IndexStore(small_index).search(vec, "image", 44)]
    body = {"embedding": vec.tolist(), "k": 44, "modality": "image"}
    resp = _post(url, "/v1/search", {**body, "index": "small"})
    assert _hits(resp) == want and len(want) == SMALL_ROWS
    assert len(_hits(_post(url, "/v1/search", body))) == 44             # the default: main
    thumb = resp.json()["results"][0]["image_url"]
    assert thumb.endswith("?index=small")
    assert requests.get(url.rsplit(PREFIX, 1)[0] + thumb, timeout=30).status_code == 200
    knn = _post(url, "/knn-service", {"embedding_input": vec.tolist(), "modality": "image",
                                      "num_images": 44, "indice_name": "small"})
    assert _hits(knn) == want
    assert _post(url, "/metadata", {"ids": [28], "indice_name": "small"}).status_code == 200
    assert _post(url, "/metadata", {"ids": [30], "indice_name": "small"}).status_code == 404
    assert _post(url, "/metadata", {"ids": [30], "indice_name": "main"}).status_code == 200
    for path, extra in (("/v1/search", {"index": "nope"}), ("/knn-service", {"indice_name": "nope"}),
                        ("/metadata", {"indice_name": "nope", "ids": [0]})):
        payload = {"embedding": vec.tolist()} if path == "/v1/search" else {"embedding_input": vec.tolist()}
        resp = _post(url, path, {**payload, **extra} if path != "/metadata" else extra)
        assert resp.status_code == 404 and "nope" in resp.json()["detail"], (path, resp.text)


def test_each_shard_searches_its_own_tuned_index(sharded, tuned_index):
    """An index built with ``ann.shards: 2`` is searched by each shard with its own HNSW file at
    the stored efSearch: ``/healthz`` says so, the answers equal the shards' merged local
    search, a request's ``ef`` reaches every shard (wide: the exact top 10; narrow: less)."""
    from align_ray.serve import ann
    from align_ray.serve.shards import ShardIndex, merge

    url, _, _ = sharded
    stored = json.load(open(os.path.join(tuned_index, "index.json")))["ann_shards"]["image"]
    health = requests.get(url + "/healthz", timeout=30).json()["indexes"]["tuned"]
    assert health["shards"] == 2
    assert health["search"]["image"] == {"kind": "HNSW32, sharded", "ef": stored["ef"],
                                         "recall": stored["recall"], "recall_at": 10}
    queries = np.load(os.path.join(tuned_index, "text_embeddings.npy"))[-30:]
    _, truth = topk_exact(np.load(os.path.join(tuned_index, "image_embeddings.npy")), queries, 10)
    local_shards = [ShardIndex(tuned_index, s, 2) for s in range(2)]

    def served(ef=None) -> list[list[int]]:
        extra = {} if ef is None else {"ef": ef}
        return [[h[0] for h in _hits(_post(url, "/v1/search", {
            "embedding": q.tolist(), "modality": "image", "k": 10, "index": "tuned", **extra}))]
            for q in queries]

    def local(ef=None) -> list[list[int]]:
        ids = merge([s.search(queries, "image", 10, (None, ef)) for s in local_shards], 10)[1]
        return ids.tolist()

    for ef in (None, 10, 2048):
        assert served(ef) == local(ef), ef
    assert ann.recall_at_k(np.array(served(2048)), truth) >= 0.99
    assert ann.recall_at_k(np.array(served(10)), truth) < ann.recall_at_k(np.array(served(2048)), truth)


def test_hot_swap_answers_every_query(sharded, small_index):
    """The default index is swapped to the 29-row one while 3 clients query without pause: no
    query fails, the old index answers until the new one is loaded, then the new one; the
    Router replica is reconfigured in place (its swap counter goes on), not replaced.

    "Then the new one" is checked by send time: a query still in flight when another client got
    the new index may fairly end later with the old one, but none sent after that may."""
    from align_ray.serve.store import IndexStore

    url, args, _ = sharded
    before = requests.get(url + "/healthz", timeout=30).json()
    vec = np.random.default_rng(5).standard_normal(128).astype(np.float32)
    body = {"embedding": vec.tolist(), "k": 44, "modality": "image"}
    counts: list[int] = []
    answers: list[tuple[float, float, int]] = []  # (sent, answered, rows)
    errors: list[str] = []
    stop = threading.Event()

    def fire():
        session = requests.Session()
        while not stop.is_set():
            try:
                sent = time.monotonic()
                resp = session.post(url + "/v1/search", json=body, timeout=60)
                if resp.status_code != 200:
                    errors.append(f"{resp.status_code} {resp.text[:200]}")
                else:
                    counts.append(len(resp.json()["results"]))
                    answers.append((sent, time.monotonic(), counts[-1]))
            except Exception as e:  # noqa: BLE001 - counted, the test's point
                errors.append(repr(e))

    threads = [threading.Thread(target=fire) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        _deploy(_app_config(args, {"indexes": {"main": small_index, "small": small_index},
                                   "default": "main"}))
        deadline = time.monotonic() + 180
        while requests.get(url + "/healthz", timeout=30).json()["index"]["count"] != SMALL_ROWS:
            assert time.monotonic() < deadline, "the new index never came in"
            time.sleep(0.2)
        seen = len(counts)
        while len(counts) < seen + 20:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert counts[0] == 44 and counts[-1] == SMALL_ROWS and set(counts) == {44, SMALL_ROWS}
    # once the new index answered a query, no query sent after that got the old one
    first_new = min(done for _, done, rows in answers if rows == SMALL_ROWS)
    late_old = [(sent - first_new, rows) for sent, _, rows in answers
                if sent > first_new and rows != SMALL_ROWS]
    assert late_old == []
    after = requests.get(url + "/healthz", timeout=30).json()
    assert after["index_version"] == before["index_version"] + 1 and after["index_error"] is None
    want = [(h["id"], h["score"], h["text"]) for h in IndexStore(small_index).search(vec, "image", 44)]
    assert _hits(_post(url, "/v1/search", body)) == want


def _running(app: str, name: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[name].replica_states
    return int(states.get("RUNNING", 0))


def test_shards_scale_on_their_own(serve_app, tiny_model, small_index):
    """Each ``IndexShard`` deployment scales on its own load, as the encoders do, at the
    shipped ``target_ongoing_requests`` (one batch per replica).  An app of its own (the
    module's app has loaded three indexes into its shards, which scaling would see as load):
    encoders and shards may each scale from 1 to 2 replicas.

    The load on the shards comes the way a second Router replica sends it: the Router's own
    sharded search (:class:`ShardedSearch` behind a :class:`NaturalBatcher` with the Router's
    batches in flight) on this process's handles to the shards, with 96 callers queued on it
    (more than one full batch of 32 waits, so a second batch goes out).
    Through HTTP alone the shards are not what is busy: a 29-row search is short, and on a
    loaded box (CI runs two halves side by side) the proxy and the Router's request handling
    cap the queries per second long before a shard queues, so the autoscaler rightly keeps one.
    Vector queries over HTTP run meanwhile: every one answered, the encoders (which no vector
    query reaches) stay at 1 while both shards reach 2."""
    import asyncio

    from ray import serve

    from align_ray.serve.batcher import NaturalBatcher
    from align_ray.serve.config import ShardConfig
    from align_ray.serve.shards import ShardedSearch
    from align_ray.serve.store import IndexStore

    client, cfg = serve_app
    app, prefix = "align-shard-scale", "/shard-scale"
    enc = dict(min_replicas=1, max_replicas=2, num_cpus=0.05, max_batch_size=8,
               batch_wait_timeout_s=0.01, max_ongoing_requests=16, target_ongoing_requests=4)
    shard = dict(min_replicas=1, max_replicas=2, num_cpus=0.05, max_ongoing_requests=16,
                 upscale_delay_s=1.0, downscale_delay_s=2.0, look_back_period_s=2.0)
    args = dict(model=tiny_model, index=small_index, index_shards=2, index_shard=shard,
                image_encoder=enc, text_encoder=enc, router={"num_cpus": 0.05},
                limits=TEST_LIMITS, app_name=app)
    serve.run_many([serve.RunTarget(app_builder(args), name=app, route_prefix=prefix)],
                   wait_for_applications_running=False)
    deps = ("IndexShard0", "IndexShard1", "TextEncoder", "ImageEncoder")
    url = f"http://{cfg.host}:{cfg.port}{prefix}"
    try:
        wait_running(app, 180)
        t0, since = time.monotonic(), None      # the warm-up loads are over: all at 1 for 3 s
        while since is None or time.monotonic() - since < 3:
            assert time.monotonic() - t0 < 60, [_running(app, d) for d in deps]
            at_one = [_running(app, d) for d in deps] == [1, 1, 1, 1]
            since = (since or time.monotonic()) if at_one else None
            time.sleep(0.25)
        vecs = np.random.default_rng(5).standard_normal((32, 128)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        stop, codes, searched = threading.Event(), [], []

        def http_loop(i: int) -> None:
            with requests.Session() as sess:
                while not stop.is_set():
                    body = {"embedding": vecs[i % 32].tolist(), "k": 10, "modality": "image"}
                    codes.append(sess.post(url + "/v1/search", json=body, timeout=60).status_code)
                    i += 4

        async def second_router() -> None:
            handles = [serve.get_deployment_handle(f"IndexShard{s}", app) for s in range(2)]
            store = IndexStore(small_index, vectors=False)
            search = ShardedSearch(handles, small_index, store)
            batcher = NaturalBatcher(search.search_many,
                                     in_flight=ShardConfig(**shard).batches_in_flight())

            async def caller(i: int) -> None:
                while not stop.is_set():
                    searched.append(len(await batcher.submit((vecs[i % 32], "image", 10, False))))
                    i += 96

            await asyncio.gather(*(caller(i) for i in range(96)))

        threads = [threading.Thread(target=http_loop, args=(i,), daemon=True) for i in range(4)]
        threads.append(threading.Thread(target=asyncio.run, args=(second_router(),), daemon=True))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            counts = []
            while time.monotonic() - t0 < 90 and counts[:2] != [2, 2]:
                time.sleep(0.25)
                counts = [_running(app, d) for d in deps]
            scaled_s = time.monotonic() - t0
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        print(f"both shards at 2 replicas {scaled_s:.1f} s into the load; {len(codes)} HTTP "
              f"queries, {len(searched)} through the second router")
        assert counts == [2, 2, 1, 1], counts
        assert codes and set(codes) == {200}
        assert searched and set(searched) == {10}
    finally:
        serve.delete(app)
