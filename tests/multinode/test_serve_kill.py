"""A worker node dies while the Serve app answers under load (tests/multinode/cluster.py).

``align-ray index`` and ``align-ray serve`` run as their own processes on the multi-node
cluster, the serve one with two TextEncoder replicas on different nodes
(``max_replicas_per_node: 1``) and one proxy on the head (every "node" of this box shares one
host, so only one proxy can hold the port).  Eight clients post ``/v1/embed/text`` without
pause; the node of a TextEncoder replica that does not also host the Router is SIGKILLed, and a
replacement node joins, as an autoscaler would start one.  Checked:

* every request gets an answer: no client times out, no connection fails;
* every 200 carries the embedding the model gives that text (compared with answers from
  before the kill), every other answer is a 503 with a detail and ``Retry-After``, and fast;
* the service is whole again within a bound: all answers 200 from some moment on, two
  TextEncoder replicas running, ``/healthz`` ok.  The measured recovery time is printed.
* the replicas never ran on the CPU-0 head.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests

from tests.conftest import DEV_SET
from tests.multinode.conftest import ensure
from tests.multinode.serving import build_index, check_placement, served

pytestmark = pytest.mark.skipif(not DEV_SET.exists(), reason="needs the shared dev set")

TEXTS = [f"a picture of thing number {i}" for i in range(16)]
PER_REQUEST = 32     # texts per request: long enough calls that some are inside the victim
CLIENTS = 8
FAST_S = 15.0        # a refusal must come faster than this (the router's call timeout is 10 s)
RECOVER_S = 90.0     # the bound on "whole again" after the kill


def test_serve_survives_losing_an_encoder_node(cluster, tiny_model, corpus, tmp_path):
    ensure(cluster, cpu_worker=1, gpu_train=2)
    idx = build_index(cluster, tiny_model, corpus["path"], tmp_path / "idx")
    enc = dict(num_cpus=0.3, max_batch_size=8, max_ongoing_requests=16, target_ongoing_requests=4,
               batch_wait_timeout_s=0.002)
    cfg = {"text_encoder": {**enc, "min_replicas": 2, "max_replicas": 2, "max_replicas_per_node": 1},
           "image_encoder": {**enc, "min_replicas": 1, "max_replicas": 1},
           "router": {"num_cpus": 0.2, "call_timeout_s": 10}}
    with served(cluster, tmp_path, tiny_model, idx, cfg) as base:
        ref = {t: np.asarray(requests.post(f"{base}/v1/embed/text", json={"texts": [t]},
                                           timeout=30).json()["embeddings"][0]) for t in TEXTS}
        check_placement(cluster, "align")

        results: list[tuple] = []      # (start, end, status, ok, detail)
        stop = threading.Event()

        def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                texts = [TEXTS[(i + n + j) % len(TEXTS)] for j in range(PER_REQUEST)]
                n += 1
                t0 = time.monotonic()
                try:
                    r = requests.post(f"{base}/v1/embed/text", json={"texts": texts}, timeout=60)
                except requests.RequestException as e:      # lost or hung: never allowed
                    results.append((t0, time.monotonic(), None, False, repr(e)))
                    continue
                ok, detail = False, ""
                if r.status_code == 200:
                    got = np.asarray(r.json()["embeddings"])
                    ok = bool(np.abs(got - np.stack([ref[t] for t in texts])).max() < 1e-4)
                else:
                    body = r.json()
                    detail = body.get("detail", "")
                    ok = (r.status_code == 503 and bool(detail)
                          and r.headers.get("Retry-After") is not None)
                results.append((t0, time.monotonic(), r.status_code, ok, detail))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(4)
        router_nodes = {n.name for n in cluster.node_of_title("ServeReplica:align:Router")}
        victims = [n for n in cluster.node_of_title("ServeReplica:align:TextEncoder")
                   if n.name not in router_nodes]
        assert victims, "both TextEncoder replicas share the Router's node"
        t_kill = time.monotonic()
        cluster.kill(victims[0])
        cluster.add(victims[0].type)               # the replacement an autoscaler would start
        recovered, timeline = None, []          # timeline: (s after the kill, TextEncoders up)
        while time.monotonic() - t_kill < RECOVER_S:
            time.sleep(1)
            texts_up = len(cluster.node_of_title("ServeReplica:align:TextEncoder"))
            timeline.append((round(time.monotonic() - t_kill, 1), texts_up))
            failures = [r for r in results if r[2] != 200 and r[0] >= t_kill - 5]
            last_bad = max((r[1] for r in failures), default=t_kill)
            # whole again: the lost replica replaced, and 5 s of nothing but correct answers
            if (texts_up == 2 and any(up < 2 for _, up in timeline)
                    and time.monotonic() - last_bad > 5):
                recovered = max(last_bad - t_kill, next(t for t, up in reversed(timeline)
                                                        if up < 2))
                break
        time.sleep(2)
        healthy = requests.get(f"{base}/healthz", timeout=30).status_code
        stop.set()
        for t in threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in threads), "a client hung"

    after = [r for r in results if r[0] >= t_kill]
    by_status: dict = {}
    for r in results:
        by_status[r[2]] = by_status.get(r[2], 0) + 1
    bad = [r for r in results if not r[3]]
    slow = [r for r in results if r[2] != 200 and r[1] - r[0] > FAST_S]
    summary = {"requests": len(results), "after_kill": len(after), "by_status": by_status,
               "recovered_s": recovered, "replicas_after_kill": timeline,
               "max_refusal_s": max((r[1] - r[0] for r in results if r[2] != 200), default=0)}
    print("serve kill:", json.dumps({str(k): v for k, v in summary.items()}))
    assert not bad, bad[:5]
    assert not slow, slow[:5]
    assert len(after) > 50, summary
    assert recovered is not None, f"not whole again within {RECOVER_S} s: {summary}"
    assert healthy == 200

