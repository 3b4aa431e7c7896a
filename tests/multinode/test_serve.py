"""Serve in motion on the multi-node cluster (tests/multinode/cluster.py): each encoder scales on
its own load, and a node that dies under load loses no request.

``align-ray serve`` runs as its own process with one proxy on the head (every "node" of this box
shares one host, so only one proxy can hold the port); both encoders ``min_replicas: 1``,
``max_replicas: 2``, ``max_replicas_per_node: 1``.  Replica counts are the live
``ServeReplica:align:NAME`` processes on live nodes.  In order:

1. Eight closed-loop clients post texts: the TextEncoder reaches 2 replicas while the
   ImageEncoder stays at 1.
2. Under that load, the node of a TextEncoder replica that does not host the Router is
   SIGKILLed and a replacement node joins (as an autoscaler would start one).  Every request
   gets an answer (no client timeout or connection error); every 200 carries the embeddings the
   model gives those texts; anything else is a 503 with a detail and ``Retry-After``, in under
   ``FAST_S``; the TextEncoder is back at 2 replicas with 5 s of clean answers within
   ``RECOVER_S``.  The load stops; both encoders return to 1 replica.
3. The reverse with image load.

No replica runs on the CPU-0 head.  The test prints the scale-up/down delays, replica counts over
time, throughput and p50/p99 per phase, and the kill's timeline (BENCHMARKS.md, "Serving").
"""

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
from tests.multinode.serving import CLIENTS, Load, check_placement, phase, served

pytestmark = pytest.mark.skipif(not DEV_SET.exists(), reason="needs the shared dev set")

APP = "align"
TEXTS = [f"a picture of thing number {i}" for i in range(16)]
PER_REQUEST = 16     # texts per request: calls long enough that some are inside the victim
FAST_S = 15.0        # a refusal must come faster than this (the Router's call timeout is 10 s)
RECOVER_S = 90.0     # the bound on "whole again" after the kill


def test_serve_scales_each_way_and_survives_a_node_loss(cluster, tiny_model, corpus, tmp_path):
    ensure(cluster, cpu_worker=1, gpu_train=2)
    enc = dict(min_replicas=1, max_replicas=2, max_replicas_per_node=1, num_cpus=0.05,
               max_batch_size=4, batch_wait_timeout_s=0.002, max_ongoing_requests=8,
               target_ongoing_requests=1, upscale_delay_s=1.0, downscale_delay_s=2.0,
               look_back_period_s=2.0)
    cfg = {"image_encoder": enc, "text_encoder": enc,
           "router": {"num_cpus": 0.05, "call_timeout_s": 10}}

    def replicas() -> tuple[int, int]:
        return (cluster.count_title(f"ServeReplica:{APP}:TextEncoder"),
                cluster.count_title(f"ServeReplica:{APP}:ImageEncoder"))

    def until(cond, timeout: float, what: str, trace: list, t0: float,
              hold_s: float = 0.0) -> float:
        """Seconds until ``cond(text, image)`` holds, and has held for ``hold_s``."""
        start, since = time.monotonic(), None
        while time.monotonic() - start < timeout:
            now = replicas()
            trace.append((round(time.monotonic() - t0, 1), *now))
            if not cond(*now):
                since = None
            else:
                since = since or time.monotonic()
                if time.monotonic() - since >= hold_s:
                    return since - start
            time.sleep(0.5)
        raise AssertionError(f"{what} not seen within {timeout}s; (t, text, image): {trace[-10:]}")

    images = [base64.b64encode(r["image"]).decode() for r in corpus["rows"][:4]]
    report: dict = {}
    with served(cluster, tmp_path, tiny_model, None, cfg) as base:
        until(lambda t, i: t == 1 and i == 1, 120, "both encoders at 1 replica", [], time.monotonic())
        check_placement(cluster, APP)
        ref_t = {t: np.asarray(requests.post(f"{base}/v1/embed/text", json={"texts": [t]},
                                             timeout=30).json()["embeddings"][0]) for t in TEXTS}
        ref_i = [np.asarray(requests.post(f"{base}/v1/embed/image", json={"images": [im]},
                                          timeout=30).json()["embeddings"][0]) for im in images]

        def text_body(n: int) -> dict:
            return {"texts": [TEXTS[(n + j) % len(TEXTS)] for j in range(PER_REQUEST)]}

        def text_ok(n: int, js: dict) -> bool:
            want = np.stack([ref_t[t] for t in text_body(n)["texts"]])
            return bool(np.abs(np.asarray(js["embeddings"]) - want).max() < 1e-4)

        def image_body(n: int) -> dict:
            return {"images": [images[n % len(images)]]}

        def image_ok(n: int, js: dict) -> bool:
            return bool(np.abs(np.asarray(js["embeddings"][0]) - ref_i[n % len(images)]).max() < 1e-4)

        # 1. text load scales the TextEncoder alone; 2. a TextEncoder node dies under that load
        trace, t0 = [], time.monotonic()
        text = Load(f"{base}/v1/embed/text", text_body, text_ok)
        try:
            up = until(lambda t, i: t >= 2, 90, "TextEncoder scaling up", trace, t0)
            assert all(row[2] == 1 for row in trace), trace      # the ImageEncoder never moved
            check_placement(cluster, APP, ("TextEncoder",))
            time.sleep(3)
            router = {n.name for n in cluster.node_of_title(f"ServeReplica:{APP}:Router")}
            victims = [n for n in cluster.node_of_title(f"ServeReplica:{APP}:TextEncoder")
                       if n.name not in router]
            assert victims, "both TextEncoder replicas share the Router's node"
            t_kill = time.monotonic()
            cluster.kill(victims[0])
            recovered, after_kill = None, [(0.0, replicas()[0])]  # (s after, TextEncoders)
            assert after_kill[0][1] == 1, after_kill
            # the replacement an autoscaler would start (its `ray start` takes seconds)
            adder = threading.Thread(target=cluster.add, args=(victims[0].type,))
            adder.start()
            while time.monotonic() - t_kill < RECOVER_S:
                time.sleep(1)
                up_now = replicas()[0]
                after_kill.append((round(time.monotonic() - t_kill, 1), up_now))
                bad = [r for r in text.results if r[2] != 200 and r[0] >= t_kill - 5]
                last_bad = max((r[1] for r in bad), default=t_kill)
                # whole again: both replicas up, 5 s without a refusal, and every client has
                # had an answer to a request it sent after the last refusal (a client still
                # waiting on the dead replica is not served)
                fresh = sum(r[2] == 200 and r[0] >= last_bad for r in text.results)
                if (up_now == 2 and any(n < 2 for _, n in after_kill)
                        and time.monotonic() - last_bad > 5 and fresh >= CLIENTS):
                    recovered = max(last_bad - t_kill,
                                    next(t for t, n in reversed(after_kill) if n < 2))
                    break
        finally:
            text.stop()
        t_stop = time.monotonic()
        adder.join(timeout=180)
        # held for 5 s: after the node loss Serve may still be reconciling (CI once saw the
        # count at 1, then a second TextEncoder 0.7 s into the image phase, which then failed)
        down = until(lambda t, i: t == 1 and i == 1, 120, "TextEncoder back at 1", trace, t0,
                     hold_s=5)
        res = text.results
        report["TextEncoder"] = {
            "scale_up_s": round(up, 1), "scale_down_s": round(down, 1),
            "phases": {"1 replica": phase(res, t0, t0 + up),
                       "2 replicas": phase(res, t0 + up, t_kill)},
            "replicas_t_text_image": trace[::4]}
        report["kill"] = {
            "requests_after_kill": sum(r[0] >= t_kill for r in res),
            "by_status": {str(s): sum(r[2] == s for r in res) for s in {r[2] for r in res}},
            "recovered_s": recovered, "text_replicas_after_kill": after_kill,
            "max_refusal_s": round(max((r[1] - r[0] for r in res if r[2] != 200), default=0), 2),
            # the requests in flight on the killed replica: answered late or refused
            "max_latency_after_kill_s": round(max((r[1] - r[0] for r in res if r[1] >= t_kill),
                                                  default=0), 2),
            "after_kill": phase(res, t_kill, t_stop)}

        # 3. image load scales the ImageEncoder alone
        trace2, t1 = [], time.monotonic()
        image = Load(f"{base}/v1/embed/image", image_body, image_ok)
        try:
            up2 = until(lambda t, i: i >= 2, 90, "ImageEncoder scaling up", trace2, t1)
            assert all(row[1] == 1 for row in trace2), trace2    # the TextEncoder never moved
            check_placement(cluster, APP, ("ImageEncoder",))
            time.sleep(3)
            t_stop2 = time.monotonic()
        finally:
            image.stop()
        down2 = until(lambda t, i: t == 1 and i == 1, 120, "ImageEncoder back at 1", trace2, t1)
        report["ImageEncoder"] = {
            "scale_up_s": round(up2, 1), "scale_down_s": round(down2, 1),
            "phases": {"1 replica": phase(image.results, t1, t1 + up2),
                       "2 replicas": phase(image.results, t1 + up2, t_stop2)},
            "replicas_t_text_image": trace2[::4]}
        healthy = requests.get(f"{base}/healthz", timeout=30).status_code
    print("serve on the multi-node cluster:", json.dumps(report))

    wrong = [r for r in text.results + image.results if not r[3]]
    assert not wrong, wrong[:5]
    slow = [r for r in text.results if r[2] != 200 and r[1] - r[0] > FAST_S]
    assert not slow, slow[:5]
    assert recovered is not None, f"not whole again within {RECOVER_S} s: {report['kill']}"
    # the load ran through the outage and past it: at least a request per client after the
    # kill, and answers after the recovery (a count, not a rate: a loaded box serves slower)
    assert report["kill"]["requests_after_kill"] >= CLIENTS, report["kill"]
    # no client hung on the dead replica: whatever it got, it got it within the refusal bound
    assert report["kill"]["max_latency_after_kill_s"] < FAST_S, report["kill"]
    assert healthy == 200
