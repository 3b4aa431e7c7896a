"""align_ray/workflow/nodes.py: the node timeline samples the GCS and attributes busy nodes to
the running stage."""

from __future__ import annotations

import time

from align_ray.workflow.nodes import NodeTimeline


def test_timeline_sees_a_stage_use_cpus_and_records_per_stage(ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=1)
    def work(s: float) -> None:
        time.sleep(s)

    tl = NodeTimeline(interval_s=0.2).start()
    time.sleep(0.5)                       # idle, outside any stage: not in per_stage
    tl.stage = "busy"
    ray.get([work.remote(1.5), work.remote(1.5)])
    tl.stage = "idle"
    time.sleep(1.0)
    tl.stop()
    per = tl.per_stage()
    assert set(per) == {"busy", "idle"}
    node = ray.get_runtime_context().get_node_id()
    assert per["busy"]["alive_min"] >= 1 and per["busy"]["busy_nodes"] == 1
    assert per["busy"]["cpus_max"] >= 2 and per["busy"]["samples"] >= 3
    assert per["idle"]["cpus_max"] < per["busy"]["cpus_max"]
    rec = tl.record()
    assert rec["samples"] and all(len(n) == 8 for r in rec["samples"] for n in r["alive"])
    assert any(node[:8] in r["busy"] for r in rec["samples"] if r["stage"] == "busy")
