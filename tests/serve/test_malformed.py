"""520 generated bad requests: each answered 4xx with a message; afterwards the service still
answers correctly and no replica was replaced."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.serve import malformed


def _replica_pids(app_name: str) -> dict[str, int]:
    from ray import serve

    return {name: serve.get_deployment_handle(name, app_name).info.remote().result(timeout_s=60)["pid"]
            for name in ("ImageEncoder", "TextEncoder")}


def test_malformed_requests_get_4xx_and_service_survives(serve_app, embedder, corpus):
    from ray import serve

    client, cfg = serve_app
    before = _replica_pids(cfg.app_name)
    cases = list(malformed.generate(cfg.limits, embedder.dim, n=520, seed=0))
    assert len(cases) >= 500

    def send(case):
        name, method, path, kw = case
        r = client.request(method, path, **kw)
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = None
        return name, r.status_code, detail

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, cases))
    bad = [(n, s, d) for n, s, d in results if not 400 <= s < 500 or not d]
    assert not bad, f"{len(bad)} requests not answered 4xx-with-message, e.g. {bad[:10]}"
    by_status = collections.Counter(s for _, s, _ in results)
    assert {400, 404, 405, 413, 422} <= set(by_status), by_status

    # still answers correctly, same replicas
    texts = ["grinning face", "red heart"]
    np.testing.assert_allclose(client.embed_text(texts), embedder.embed_texts(texts), atol=1e-4)
    hits = client.search(image=corpus["rows"][4]["image"], modality="image", k=3)
    assert hits[0]["text"] == corpus["rows"][4]["text"]
    assert client.healthz()["status"] == "ok"
    assert _replica_pids(cfg.app_name) == before
    status = serve.status().applications[cfg.app_name]
    assert status.status == "RUNNING"
    assert all(d.status == "HEALTHY" for d in status.deployments.values())
