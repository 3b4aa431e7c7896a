"""Independent scaling, seen: sustained text load scales the TextEncoder up while the
ImageEncoder stays at its minimum, both return to their minimum after the load, then the
reverse with image load.  Real Serve autoscaling, through HTTP, on the session's Ray (a second
app beside the package's, on the same proxy); the replica counts come from ``serve.status()``."""

from __future__ import annotations

import base64
import threading
import time

import requests

APP = "align-autoscale"
PREFIX = "/scale"


def _replicas(name: str) -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments[name]
    return int(dep.replica_states.get("RUNNING", 0))


def _states() -> dict:
    from ray import serve

    deps = serve.status().applications[APP].deployments
    return {n: (str(d.status), dict(d.replica_states), d.message[:80]) for n, d in deps.items()
            if n != "Router"}


def _until(cond, timeout: float, what: str, trace: list) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        trace.append((round(time.monotonic() - t0, 1), _replicas("TextEncoder"), _replicas("ImageEncoder")))
        if cond():
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout}s; (t, text, image) replicas: "
                         f"{trace[-10:]}; now {_states()}")


def _load(url: str, body: dict, stop: threading.Event, errors: list) -> None:
    with requests.Session() as s:
        while not stop.is_set():
            r = s.post(url, json=body, timeout=60)
            if r.status_code != 200:
                errors.append((r.status_code, r.text[:200]))


def test_each_encoder_scales_on_its_own_load(serve_app, tiny_model, corpus):
    from ray import serve

    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    client, base_cfg = serve_app
    enc = dict(min_replicas=1, max_replicas=2, num_cpus=0.05, max_batch_size=4,
               batch_wait_timeout_s=0.002, max_ongoing_requests=8, target_ongoing_requests=1,
               upscale_delay_s=1.0, downscale_delay_s=2.0, look_back_period_s=2.0)
    cfg = ServeConfig.from_dict(dict(model=tiny_model, port=base_cfg.port, app_name=APP,
                                     route_prefix=PREFIX, image_encoder=enc, text_encoder=enc,
                                     router={"num_cpus": 0.05}))
    base = app.start(cfg)
    assert base.endswith(PREFIX)
    image = base64.b64encode(corpus["rows"][0]["image"]).decode()
    loads = {"TextEncoder": (f"{base}/v1/embed/text", {"texts": ["grinning face", "red heart"]}),
             "ImageEncoder": (f"{base}/v1/embed/image", {"images": [image]})}
    try:
        _until(lambda: _replicas("TextEncoder") == 1 and _replicas("ImageEncoder") == 1, 120,
               "both encoders at 1 replica", [])
        for busy, idle in (("TextEncoder", "ImageEncoder"), ("ImageEncoder", "TextEncoder")):
            stop, errors, trace = threading.Event(), [], []
            clients = [threading.Thread(target=_load, args=(*loads[busy], stop, errors))
                       for _ in range(8)]
            for t in clients:
                t.start()
            try:
                up = _until(lambda: _replicas(busy) >= 2, 90, f"{busy} scaling up", trace)
                # the idle encoder never moved while the busy one scaled up
                assert all(row[1 if idle == "TextEncoder" else 2] == 1 for row in trace), trace
            finally:
                stop.set()
                for t in clients:
                    t.join()
            assert not errors, errors[:5]
            down = _until(lambda: _replicas(busy) == 1 and _replicas(idle) == 1, 120,
                          f"{busy} back at its minimum", trace)
            print(f"{busy}: scaled up after {up:.1f}s of load, back to 1 replica "
                  f"{down:.1f}s after it stopped")
    finally:
        serve.delete(APP)
