"""The HTTP API of a running app, through the Python client (real Serve, real HTTP)."""

from __future__ import annotations

import numpy as np
import pytest

from align_ray.client import APIError


def test_healthz(serve_app):
    client, _ = serve_app
    h = client.healthz()
    assert h["status"] == "ok"
    assert h["image_encoder"] == "ok" and h["text_encoder"] == "ok"
    assert h["index"]["count"] > 0 and h["index"]["dim"] == 128


def test_encoder_replicas_apply_their_user_config(serve_app):
    from ray import serve

    _, cfg = serve_app
    for name, enc in (("TextEncoder", cfg.text_encoder), ("ImageEncoder", cfg.image_encoder)):
        info = serve.get_deployment_handle(name, cfg.app_name).info.remote().result(timeout_s=60)
        assert info["max_batch_size"] == enc.max_batch_size
        assert info["batch_wait_timeout_s"] == pytest.approx(enc.batch_wait_timeout_s)
        assert info["gil_switch_interval_s"] == pytest.approx(enc.gil_switch_interval_s)
        assert enc.gil_switch_interval_s != 0.005          # not CPython's default: really applied


def test_embed_text_matches_local_model(serve_app, embedder):
    client, _ = serve_app
    texts = ["grinning face", "a red heart", "grinning face"]
    got = client.embed_text(texts)
    assert got.shape == (3, embedder.dim)
    np.testing.assert_allclose(got, embedder.embed_texts(texts), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_embed_image_matches_local_model(serve_app, embedder, corpus):
    client, _ = serve_app
    images = [corpus["rows"][i]["image"] for i in (0, 1)]
    got = client.embed_image(images)
    np.testing.assert_allclose(got, embedder.embed_images(images), atol=1e-4)
    raw = client.request("POST", "/v1/embed/image", json={"images": []})
    assert raw.status_code == 422


def test_search_by_image_finds_itself(serve_app, corpus):
    client, _ = serve_app
    hits = client.search(image=corpus["rows"][11]["image"], modality="image", k=5)
    assert len(hits) == 5
    assert hits[0]["text"] == corpus["rows"][11]["text"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert {"id", "score", "text", "url", "image_url"} <= set(hits[0])


def test_search_by_text_agrees_with_local_exact_search(serve_app, embedder, index_dir):
    from align_ray.serve.store import IndexStore

    client, _ = serve_app
    hits = client.search(text="smiling face", k=7)             # text -> image index by default
    store = IndexStore(index_dir)
    want = store.search(embedder.embed_texts(["smiling face"])[0], "image", 7)
    assert [h["id"] for h in hits] == [w["id"] for w in want]
    assert all(h["modality"] == "image" for h in hits)
    by_embedding = client.search(embedding=embedder.embed_texts(["smiling face"])[0], k=7)
    assert [h["id"] for h in by_embedding] == [w["id"] for w in want]


def test_search_dedup(serve_app, corpus):
    from tests.serve.conftest import DUP_IMAGES

    client, _ = serve_app
    src = corpus["rows"][DUP_IMAGES[0]]["image"]
    plain = client.search(image=src, modality="image", k=3)
    assert plain[1]["text"].startswith("another caption")      # the re-encoded copy is next
    deduped = client.search(image=src, modality="image", k=3, dedup=True)
    assert len(deduped) == 3
    assert not any(h["text"].startswith("another caption 0") for h in deduped)


def test_image_to_captions(serve_app, corpus):
    client, _ = serve_app
    hits = client.search(image=corpus["rows"][2]["image"], k=4)   # image -> text index by default
    assert len(hits) == 4 and all(h["modality"] == "text" for h in hits)


def test_classify_sorted_probabilities(serve_app, corpus, embedder):
    client, _ = serve_app
    labels = ["cat", "dog", "red", "blue"]
    out = client.classify(corpus["rows"][0]["image"], labels, templates=["a photo of a {}", "{}"])
    got_labels, scores = zip(*out)
    assert sorted(got_labels) == sorted(labels)
    assert list(scores) == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    img = embedder.embed_images([corpus["rows"][0]["image"]])[0]
    txt = embedder.embed_texts([t.format(label) for label in labels for t in ("a photo of a {}", "{}")])
    lab = txt.reshape(4, 2, -1).mean(1)
    lab /= np.linalg.norm(lab, axis=1, keepdims=True)
    assert got_labels[0] == labels[int(np.argmax(lab @ img))]


def test_thumbnail_and_errors(serve_app):
    client, _ = serve_app
    hits = client.search(text="face", k=1)
    data = client.request("GET", hits[0]["image_url"]).content
    assert data[:3] == b"\xff\xd8\xff"                             # a JPEG
    with pytest.raises(APIError) as e:
        client.image(10**6)
    assert e.value.status == 404
    with pytest.raises(APIError) as e:
        client.search(text="face", modality="video")
    assert e.value.status == 422 and "modality" in e.value.message


def test_body_cap_is_the_configured_one(serve_app):
    """The Router's ``limits.max_body_bytes`` (1 MiB here, 16 MiB by default) is what the body
    middleware enforces: the config must reach the app copy that Serve actually serves."""
    client, cfg = serve_app
    cap = cfg.limits.max_body_bytes
    assert cap < 16 * 1024 * 1024
    r = client.request("POST", "/v1/embed/text", json={"texts": ["a"], "pad": "x" * cap})
    assert r.status_code == 413 and str(cap) in r.json()["detail"]
