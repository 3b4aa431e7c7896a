"""The serve stage: deploy the Serve application (``align_ray.serve.app``, as ``align-ray serve``
does), wait until it answers, send the example queries through :class:`align_ray.client.
AlignClient` (text -> images, with the hits' thumbnails for the report), and print them."""

from __future__ import annotations

import base64
import dataclasses
import socket
import time

from align_ray.workflow.config import RunConfig
from align_ray.workflow.stages import Run


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_healthy(client, timeout: float = 180.0) -> dict:
    from align_ray.client import APIError

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            return client.healthz()
        except (APIError, OSError) as e:  # requests' ConnectionError is an OSError
            last = e
            time.sleep(1.0)
    raise TimeoutError(f"the Serve app at {client.base_url} did not become healthy: {last}")


def queries(cfg: RunConfig, url: str) -> list[dict]:
    """Each query of the run -> its top-k images (id, score, caption, thumbnail data URI)."""
    from align_ray.client import AlignClient

    client = AlignClient(url, timeout=120)
    out = []
    for q in cfg.queries:
        t = time.perf_counter()
        hits = client.search(text=q, k=cfg.top_k)
        ms = (time.perf_counter() - t) * 1000
        print(f"[serve] query {q!r} ({ms:.0f} ms):")
        for h in hits:
            h["thumb"] = "data:image/jpeg;base64," + base64.b64encode(
                client.image(h["id"])).decode("ascii")
            print(f"[serve]   {h['score']:+.3f}  #{h['id']:<5} {h.get('text', '')!r}")
        out.append({"query": q, "ms": round(ms, 1), "hits": hits})
    return out


def start(run: Run) -> tuple[str, list[dict]]:
    """Deploy the app (Ray must be initialised); returns (URL, example query results)."""
    from align_ray.client import AlignClient
    from align_ray.serve import app

    cfg = run.cfg
    with run.stage("serve") as rec:
        scfg = dataclasses.replace(cfg.serve)   # model/index local or s3:// (each replica loads)
        if not _port_free(scfg.host, scfg.port):
            port = _free_port(scfg.host)
            print(f"[serve] port {scfg.port} is taken on {scfg.host}: using {port}")
            scfg.port = port
        app.check_paths(scfg)
        url = app.start(scfg)
        health = _wait_healthy(AlignClient(url))
        print(f"[serve] {url} is up: {health.get('index')}", flush=True)
        results = queries(cfg, url)
        rec["summary"] = {"url": url, "app": scfg.app_name,
                          "model": cfg.serve.model, "index": cfg.serve.index,
                          "queries": [{**r, "hits": [{k: v for k, v in h.items() if k != "thumb"}
                                                     for h in r["hits"]]} for r in results]}
        return url, results


def stop(app_name: str, whole_instance: bool) -> None:
    """Delete the app (a shared cluster) or shut Serve down (the cluster this run started)."""
    from ray import serve

    t = time.time()
    if whole_instance:
        serve.shutdown()
    else:
        serve.delete(app_name)
    print(f"[serve] stopped ({time.time() - t:.1f}s)", flush=True)
