"""Independent scaling, seen on the multi-node cluster: sustained text load scales the
TextEncoder up while the ImageEncoder stays at its minimum, both return to their minimum after
the load, then the reverse with image load.  Real Serve autoscaling of an ``align-ray serve``
process, through HTTP; the replica counts are the live ``ServeReplica:APP:NAME`` processes on
the worker nodes.  Prints, per phase, the replica counts over time next to throughput and
p50/p99 latency, and the scale-up and scale-down delays (BENCHMARKS.md, "Serving")."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import requests

from tests.conftest import DEV_SET
from tests.multinode.conftest import ensure
from tests.multinode.serving import check_placement, served

pytestmark = pytest.mark.skipif(not DEV_SET.exists(), reason="needs the shared dev set")

APP = "align"
CLIENTS = 8


def _load(url: str, body: dict, stop: threading.Event, out: list) -> None:
    with requests.Session() as s:
        while not stop.is_set():
            t0 = time.monotonic()
            r = s.post(url, json=body, timeout=60)
            out.append((t0, time.monotonic() - t0, r.status_code, r.text[:200]))


def test_each_encoder_scales_on_its_own_load(cluster, tiny_model, corpus, tmp_path):
    ensure(cluster, cpu_worker=1, gpu_train=2)
    enc = dict(min_replicas=1, max_replicas=2, num_cpus=0.05, max_batch_size=4,
               batch_wait_timeout_s=0.002, max_ongoing_requests=8, target_ongoing_requests=1,
               upscale_delay_s=1.0, downscale_delay_s=2.0, look_back_period_s=2.0)
    cfg = {"image_encoder": enc, "text_encoder": enc, "router": {"num_cpus": 0.05}}

    def replicas() -> tuple[int, int]:
        return (cluster.count_title(f"ServeReplica:{APP}:TextEncoder"),
                cluster.count_title(f"ServeReplica:{APP}:ImageEncoder"))

    def until(cond, timeout: float, what: str, trace: list, t0: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            now = replicas()
            trace.append((round(time.monotonic() - t0, 1), *now))
            if cond(*now):
                return time.monotonic() - start
            time.sleep(0.5)
        raise AssertionError(f"{what} not seen within {timeout}s; (t, text, image): {trace[-10:]}")

    image = base64.b64encode(corpus["rows"][0]["image"]).decode()
    report = {}
    with served(cluster, tmp_path, tiny_model, None, cfg) as base:
        loads = {"TextEncoder": (f"{base}/v1/embed/text", {"texts": ["grinning face", "red heart"]}),
                 "ImageEncoder": (f"{base}/v1/embed/image", {"images": [image]})}
        until(lambda t, i: t == 1 and i == 1, 120, "both encoders at 1 replica", [], time.monotonic())
        check_placement(cluster, APP)
        for busy, idle in (("TextEncoder", "ImageEncoder"), ("ImageEncoder", "TextEncoder")):
            col = 1 if busy == "TextEncoder" else 2
            stop, done, trace, t0 = threading.Event(), [], [], time.monotonic()
            clients = [threading.Thread(target=_load, args=(*loads[busy], stop, done))
                       for _ in range(CLIENTS)]
            for t in clients:
                t.start()
            try:
                up = until(lambda *n: n[col - 1] >= 2, 90, f"{busy} scaling up", trace, t0)
                # the idle encoder never moved while the busy one scaled up
                assert all(row[3 - col] == 1 for row in trace), trace
                time.sleep(3)                   # a few seconds at 2 replicas, for the latency rows
                t_stop = time.monotonic()
            finally:
                stop.set()
                for t in clients:
                    t.join()
            errors = [r for r in done if r[2] != 200]
            assert not errors, errors[:5]
            down = until(lambda t, i: t == 1 and i == 1, 120, f"{busy} back at its minimum",
                         trace, t0)
            check_placement(cluster, APP, (busy,))
            lat = np.array([r[1] for r in done]) * 1000
            starts = np.array([r[0] for r in done])
            phases = {}
            for name, lo, hi in (("1 replica", t0, t0 + up), (f"{busy} at 2", t0 + up, t_stop)):
                sel = (starts >= lo) & (starts < hi)
                if sel.any():
                    phases[name] = {"requests": int(sel.sum()), "req_per_s": round(sel.sum() / (hi - lo), 1),
                                    "p50_ms": round(float(np.percentile(lat[sel], 50)), 1),
                                    "p99_ms": round(float(np.percentile(lat[sel], 99)), 1)}
            report[busy] = {"scale_up_s": round(up, 1), "scale_down_s": round(down, 1),
                            "phases": phases, "replicas_t_text_image": trace[::4]}
    print("serve autoscale:", json.dumps(report))
