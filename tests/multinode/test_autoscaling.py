"""Ray's real autoscaler starts worker nodes for the download and filter stages and removes
them after the idle timeout (issue 15 part 2), on an autoscaling cluster built from
``clusters/aws.yaml``'s node types (tests/multinode/autoscaling.py).

The workflow runs as a user runs it against a cluster: ``python workflows/end_to_end.py`` with
``RAY_ADDRESS`` set, so its plain ``ray.init()`` joins.  The cluster starts with the CPU-0 head
alone.  The run config asks for 2 download actors (``data.processes``, as
``workflows/configs/cloud.yaml`` asks for 240).  The test samples the GCS every second, and the
workflow records its own node timeline in ``workflow.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.conftest import REPO
from tests.multinode.autoscaling import MAX_WORKERS, AutoscalingLocalCluster

IDLE_TIMEOUT_S = 15


@pytest.fixture
def autoscaling():
    c = AutoscalingLocalCluster(idle_timeout_s=IDLE_TIMEOUT_S)
    try:
        c.start()
        yield c
    finally:
        c.shutdown()


@pytest.mark.timeout(900)
def test_autoscaler_adds_cpu_nodes_for_download_and_filter_then_removes_them(autoscaling):
    c = autoscaling
    assert [n["type"] for n in c.nodes()] == ["head"], "min_workers is 0: the head alone"
    conf = c.root / "run.yaml"
    conf.write_text(yaml.safe_dump({"data": {"processes": 2}}))
    out = c.root / "run"

    seen: list[tuple[float, list[str]]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            try:
                seen.append((round(time.monotonic() - t0, 1),
                             sorted(n["type"] for n in c.nodes())))
            except Exception:  # noqa: BLE001 - a missed sample is not a failure
                pass
            stop.wait(1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = subprocess.run([sys.executable, "workflows/end_to_end.py", "--smoke",
                              "--stages", "data,filter", "--config", str(conf),
                              "--output", str(out)], cwd=REPO, env=c.env,
                             capture_output=True, text=True, timeout=600)
        t_done = time.monotonic()
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        # then the idle nodes go, after the idle timeout (+ the autoscaler's 1 s update loop
        # and the node's drain): the head alone again
        gone_s, _ = c.wait_nodes(lambda n: len(n) == 1, IDLE_TIMEOUT_S + 90,
                                 "idle worker nodes removed")
    finally:
        stop.set()
        sampler.join(timeout=70)
    idle_after_run_s = round(time.monotonic() - t_done, 1)

    print("nodes alive (s since the run started: node types), changes only:")
    last = None
    for t, types in seen:
        if types != last:
            print(f"  {t:6.1f}  {types}")
            last = types
    record = json.loads((out / "workflow.json").read_text())
    per = record["nodes"]["per_stage"]
    print("workflow.json nodes.per_stage:", json.dumps(per))
    print(f"the head alone again {idle_after_run_s} s after the run ended "
          f"(idle timeout {IDLE_TIMEOUT_S} s)")

    assert {n: s["status"] for n, s in record["stages"].items()} == {"data": "ran",
                                                                     "filter": "ran"}
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["complete"] and stats["input_rows"] == 300
    # the download started with no worker node and ran on the 2 nodes the autoscaler added
    assert per["data"]["alive_min"] == 1, per
    assert per["data"]["busy_nodes"] >= 2 and per["data"]["alive_max"] >= 3, per
    assert per["filter"]["busy_nodes"] >= 1, per
    # CPU work never starts the A100 type (CPU 0), and starts the L4 type (4 CPUs on AWS) only
    # once the CPU type is at its max_workers: the autoscaler keeps CPU-only demand off GPU
    # types while a CPU type can take it (README "How the autoscaler behaves")
    assert not any("gpu_train" in types for _, types in seen), seen
    most_cpu = max(types.count("cpu_worker") for _, types in seen)
    if any("gpu_serve" in types for _, types in seen):
        assert most_cpu == MAX_WORKERS["cpu_worker"], seen
    assert most_cpu >= 2, seen
    # removal waited for idleness: the nodes were still up when the run ended
    assert any(len(types) > 1 and t >= t_done - t0 - 2 for t, types in seen), seen
    assert gone_s <= IDLE_TIMEOUT_S + 90
