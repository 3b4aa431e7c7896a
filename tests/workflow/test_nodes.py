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

    free = ray.available_resources().get("CPU", 0)
    tl = NodeTimeline(interval_s=0.2).start()
    time.sleep(0.5)                       # idle, outside any stage: not in per_stage
    tl.stage = "busy"
    ray.get([work.remote(1.5), work.remote(1.5)])
    # the GCS frees the tasks' CPUs a moment after they return: a sample taken in between
    # counted them for "idle" once (cpus_max 2.0 in both stages)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.05)
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
    ids = rec["node_ids"]
    assert rec["samples"] and all(n in ids for r in rec["samples"] for n in r["alive"])
    assert any(ids[n] == node for r in rec["samples"] if r["stage"] == "busy" for n in r["busy"])


def test_record_names_nodes_whose_ids_share_a_prefix_apart():
    tl = NodeTimeline()
    a, b = "f" * 51 + "00001", "f" * 51 + "00002"     # the fake provider's node ids
    tl.rows = [{"t": 0.0, "stage": "data", "alive": [a], "busy": {a: 1.0}, "gpus": 0.0},
               {"t": 2.0, "stage": "data", "alive": [a, b], "busy": {a: 1.0, b: 1.0}, "gpus": 0.0}]
    rec = tl.record()
    assert rec["samples"][1]["busy"] == {"n1": 1.0, "n2": 1.0}
    assert rec["node_ids"] == {"n1": a, "n2": b}
    assert rec["per_stage"]["data"]["busy_nodes"] == 2


def test_a_stage_is_sampled_the_moment_it_starts(ray_cluster):
    """The loop samples every 60 s here, so only ``enter`` can have sampled the stages: each
    gets exactly one sample, taken as it started ("" between stages gets none)."""
    tl = NodeTimeline(interval_s=60).start()
    time.sleep(0.5)                       # the loop's first sample, outside any stage
    before = len(tl.rows)
    tl.enter("data")
    tl.enter("")
    tl.enter("filter")
    tl.stop()
    assert [r["stage"] for r in tl.rows[before:]] == ["data", "filter"]
    per = tl.per_stage()
    assert per["data"]["samples"] == per["filter"]["samples"] == 1
    assert per["data"]["alive_min"] >= 1


def test_a_short_stage_is_sampled_densely_from_its_start(ray_cluster):
    """A stage shorter than the steady interval (60 s here) is still seen busy: its first
    ``burst_s`` are sampled every ``burst_interval_s`` (a smoke run's filter stage fell between
    two 2 s samples and seemed to have used no node)."""
    ray = ray_cluster

    @ray.remote(num_cpus=1)
    def work(s: float) -> None:
        time.sleep(s)

    tl = NodeTimeline(interval_s=60, burst_interval_s=0.1, burst_s=5).start()
    time.sleep(0.3)                       # the loop now waits out its 60 s interval
    tl.enter("prep")                      # nothing runs yet: enter's own sample sees no work
    ref = work.remote(1.0)
    ray.get(ref)
    tl.enter("")
    n = len(tl.rows)
    time.sleep(0.5)                       # between stages: no burst, the steady interval again
    tl.stop()
    per = tl.per_stage()
    assert per["prep"]["busy_nodes"] == 1 and per["prep"]["samples"] >= 5, per
    # at most a burst sample already in flight when the stage ended (CI caught one) and the
    # loop's wake-up sample, then its 60 s wait; a burst still going would add about 5
    assert len(tl.rows) - n <= 2
