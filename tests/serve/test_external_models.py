"""Published dual encoders through Ray: ``align-ray index`` (Ray Data actors) and a Serve app
(both encoders, the Router, search, ``/v1/classify`` with templates, clip-retrieval's API, the
page and thumbnails) on each kind of ``--model`` (HF ALIGN / CLIP / SigLIP dirs,
``open_clip:ARCH:CKPT``).  Every vector that comes back is checked against the library's own
embeddings, and every search against a brute-force search over them.

The index is built by the CLI's ``main`` in the test process, on the session cluster, as
``align-ray eval`` is in tests/model/test_external.py: a subprocess per model (a Ray driver of
its own, whose job needs fresh worker processes) cost CI about a minute over the five kinds,
and the CLI as a subprocess is tested in tests/test_cli_stages.py.  The app is deployed beside
the package's app, under its own route, with 0-CPU replicas, so the index's tasks of a later
model never wait for this one's replicas."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.cli import main
from align_ray.model.transforms import decode_rgb
from tests.model.external_models import (  # noqa: F401
    assert_embeds_like, captions, external_spec, png, reference,
)
from tests.serve.conftest import TEST_LIMITS

N = 10
K = 3
TEMPLATES = ["a photo of a {}.", "{} picture"]
LABELS = ["cat", "dog", "red car"]


@pytest.fixture(scope="module")
def ext_corpus(tmp_path_factory) -> dict:
    rows = [{"image": png(100 + i), "text": t, "url": f"http://example.invalid/{i}.png"}
            for i, t in enumerate(captions(N))]
    rows.append({"image": b"not an image", "text": "broken row", "url": "http://example.invalid/x"})
    path = tmp_path_factory.mktemp("ext-corpus") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return {"path": str(path), "rows": rows[:N]}


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a, np.float32) * np.asarray(b, np.float32)).sum(1)


def _same_top_k(hits: list[dict], brute: np.ndarray, k: int) -> None:
    """The hits are a top-k of the brute-force scores: their true scores are the k best (up to
    float noise, so near-ties may swap) and the reported scores are those true scores."""
    ids = [h["id"] for h in hits]
    assert len(ids) == k == len(set(ids))
    np.testing.assert_allclose([h["score"] for h in hits], brute[ids], atol=1e-4)
    np.testing.assert_allclose(brute[ids], np.sort(brute)[::-1][:k], atol=1e-4)


def test_index_and_serve_match_the_librarys_embeddings(external_spec, ext_corpus, serve_app,
                                                        tmp_path):
    from ray import serve

    from align_ray.client import AlignClient, b64
    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    rows = ext_corpus["rows"]
    images, texts = [r["image"] for r in rows], [r["text"] for r in rows]
    ref_img, ref_txt = reference(external_spec, [decode_rgb(b) for b in images], texts)

    out = str(tmp_path / "idx")
    assert main(["index", "--model", external_spec, "--data", ext_corpus["path"], "--output", out,
                 "--batch-size", "4", "--thumb-size", "32"]) == 0
    manifest = json.loads(open(os.path.join(out, "index.json")).read())
    assert (manifest["count"], manifest["dropped"], manifest["dim"]) == (N, 1, ref_img.shape[1])
    for m, ref in (("image", ref_img), ("text", ref_txt)):
        stored = np.load(os.path.join(out, f"{m}_embeddings.npy"))
        assert_embeds_like(stored, ref, m)

    client, base = serve_app
    name = f"ext-{os.path.basename(external_spec.rstrip('/')).replace('.pt', '')}"
    enc = dict(min_replicas=1, max_replicas=2, num_cpus=0, max_batch_size=4,
               batch_wait_timeout_s=0.01, max_ongoing_requests=16, target_ongoing_requests=2)
    cfg = ServeConfig.from_dict(dict(model=external_spec, index=out, port=base.port,
                                     image_encoder=enc, text_encoder=enc, limits=TEST_LIMITS,
                                     app_name=name, router={"num_cpus": 0},
                                     route_prefix=f"/{name}"))
    app.check_paths(cfg)
    url = app.start(cfg)
    try:
        api = AlignClient(url, timeout=60, retries=0)
        assert api.healthz()["status"] == "ok"
        assert_embeds_like(api.embed_text(texts[:4]), ref_txt[:4], "served text")
        assert_embeds_like(api.embed_image(images[:3]), ref_img[:3], "served image")

        for i in (0, 5):
            _same_top_k(api.search(image=images[i], k=K, modality="image"), ref_img @ ref_img[i], K)
            _same_top_k(api.search(text=texts[i], k=K), ref_img @ ref_txt[i], K)
            _same_top_k(api.search(image=images[i], k=K), ref_txt @ ref_img[i], K)

        got = api._call("POST", "/v1/classify",
                        {"image": b64(images[2]), "labels": LABELS, "templates": TEMPLATES})
        prompts = [t.format(label) for label in LABELS for t in TEMPLATES]
        per = reference(external_spec, [decode_rgb(images[2])], prompts)[1]
        per = per.reshape(len(LABELS), len(TEMPLATES), -1).mean(1)
        label_emb = per / np.linalg.norm(per, axis=1, keepdims=True)
        want = label_emb @ ref_img[2]
        np.testing.assert_allclose([want[LABELS.index(lb)] for lb in got["labels"]],
                                   got["similarities"], atol=1e-4)
        assert got["similarities"] == sorted(got["similarities"], reverse=True)

        # every other route (README "Stage 4"): a thumbnail, the search page, clip-retrieval's
        # API (results by text and by embedding against the brute force, their metadata)
        page = api.session.get(url + "/", timeout=60)
        assert page.status_code == 200 and "<html" in page.text.lower()
        indices = api._call("GET", "/indices-list")
        assert len(indices) == 1
        for query in ({"text": texts[5]}, {"embedding_input": ref_txt[5].tolist()}):
            knn = api._call("POST", "/knn-service", {**query, "modality": "image", "num_images": K,
                                                     "indice_name": indices[0]})
            _same_top_k([{"id": x["id"], "score": x["similarity"]} for x in knn],
                        ref_img @ ref_txt[5], K)
            assert [x["caption"] for x in knn] == [texts[x["id"]] for x in knn]
        ids = [x["id"] for x in knn]
        meta = api._call("POST", "/metadata", {"ids": ids, "indice_name": indices[0]})
        assert [m["metadata"]["caption"] for m in meta] == [texts[i] for i in ids]
        assert api.image(ids[0])[:2] == b"\xff\xd8"   # a JPEG thumbnail

        info = serve.get_deployment_handle("TextEncoder", name).info.remote().result(timeout_s=60)
        assert info["dim"] == ref_txt.shape[1] and info["temperature"] > 0

        # dynamic batching holds for this kind too: 16 single-item requests at once share
        # forward passes (max_batch_size 4), and each still gets exactly its own vector
        def one(i: int) -> np.ndarray:
            return np.asarray(AlignClient(url, timeout=60, retries=0).embed_text([texts[i % N]]))

        # the counters are per replica (max_replicas 2): sum them over every replica seen
        handle = serve.get_deployment_handle("TextEncoder", name)

        def counters() -> dict[int, tuple[int, int]]:
            seen = {}
            for _ in range(12):
                i = handle.info.remote().result(timeout_s=60)
                seen[i["pid"]] = (i["requests"], i["batches"])
            return seen

        before = counters()
        with ThreadPoolExecutor(16) as pool:
            got_txt = np.concatenate(list(pool.map(one, range(16))))
        assert _cos_rows(got_txt, ref_txt[[i % N for i in range(16)]]).min() >= 0.9999
        after = counters()
        requests = sum(r - before.get(p, (0, 0))[0] for p, (r, _) in after.items())
        batches = sum(b - before.get(p, (0, 0))[1] for p, (_, b) in after.items())
        assert requests >= 16 and batches < requests, (requests, batches, before, after)
    finally:
        serve.delete(name)
