"""The node timeline of a workflow run: which nodes were alive and which were busy, over time
and per stage.  It goes into ROOT/workflow.json (``nodes``) and the report.

A daemon thread in the driver samples the GCS every ``interval_s`` seconds.  It reads the live
nodes and, per node, the CPUs (and GPUs) in use, that is total minus available.  On an
autoscaling cluster, this shows nodes coming up for a stage and going away after the idle
timeout.  On a fixed cluster, it shows where each stage's work ran.  Only the GCS is asked:
no dashboard and no state API are needed, so it works under ``ray job submit`` and with a
plain ``ray.init()``.
"""

from __future__ import annotations

import threading
import time
from typing import Any


def sample() -> dict[str, Any]:
    """{"alive": [node ids], "busy": {node id: CPUs in use}, "gpus": GPUs in use}."""
    import ray
    from ray._private import state   # DeveloperAPI: the per-node view the GCS already has

    alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    total, avail = state.total_resources_per_node(), state.available_resources_per_node()
    busy, gpus = {}, 0.0
    for node in alive:
        t, a = total.get(node, {}), avail.get(node, {})
        used = t.get("CPU", 0.0) - a.get("CPU", 0.0)
        if used > 1e-6:
            busy[node] = round(used, 2)
        gpus += t.get("GPU", 0.0) - a.get("GPU", 0.0)
    return {"alive": alive, "busy": busy, "gpus": round(gpus, 2)}


class NodeTimeline:
    """Samples in the background; ``stage`` is whatever stage runs now (set by the Run).

    The first ``burst_s`` of each stage are sampled every ``burst_interval_s``: a short stage
    (a smoke run's filter takes 2-3 s) fell between two 2 s samples and seemed to have used no
    node at all.  A sample costs well under a millisecond of the driver's CPU; the coarser
    steady interval only keeps workflow.json small on long runs."""

    def __init__(self, interval_s: float = 2.0, burst_interval_s: float = 0.25,
                 burst_s: float = 10.0):
        self.interval_s = interval_s
        self.burst_interval_s = burst_interval_s
        self.burst_s = burst_s
        self._entered = 0.0
        self.stage = ""
        self.rows: list[dict[str, Any]] = []
        self._t0 = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()   # set by enter() and stop(): a new stage starts its burst now
        self._thread = threading.Thread(target=self._loop, name="node-timeline", daemon=True)

    def start(self) -> "NodeTimeline":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def enter(self, stage: str) -> None:
        """The stage now running ("" between stages).  A stage's first sample is taken here, at
        once: the loop's next one may come seconds later, after the stage's first demand has
        already brought up nodes (an autoscaling cluster would seem to have had them before)."""
        self.stage = stage
        self._entered = time.monotonic()
        if stage:
            self._sample()
        self._wake.set()

    def _sample(self) -> None:
        try:
            row = sample()
        except Exception:  # noqa: BLE001 - a diagnostic never fails the run
            return
        # tagged with the stage running when the answer came (as before enter() existed)
        self.rows.append({"t": round(time.time() - self._t0, 1), "stage": self.stage, **row})

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            burst = self.stage and time.monotonic() - self._entered < self.burst_s
            if self._wake.wait(self.burst_interval_s if burst else self.interval_s):
                self._wake.clear()
                # enter() has just sampled the new stage: wait one burst interval, not 0
                self._stop.wait(self.burst_interval_s)

    def per_stage(self) -> dict[str, dict[str, Any]]:
        """Per stage: alive nodes (min, max), the nodes that were ever busy, the most busy at
        once, and the peak CPUs in use."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            if not r["stage"]:
                continue
            s = out.setdefault(r["stage"], {"alive_min": len(r["alive"]), "alive_max": 0,
                                            "busy_nodes": set(), "busy_max": 0, "cpus_max": 0.0,
                                            "samples": 0})
            s["alive_min"] = min(s["alive_min"], len(r["alive"]))
            s["alive_max"] = max(s["alive_max"], len(r["alive"]))
            s["busy_nodes"].update(r["busy"])
            s["busy_max"] = max(s["busy_max"], len(r["busy"]))
            s["cpus_max"] = max(s["cpus_max"], round(sum(r["busy"].values()), 2))
            s["samples"] += 1
        return {k: {**v, "busy_nodes": len(v["busy_nodes"])} for k, v in out.items()}

    def record(self) -> dict[str, Any]:
        """What goes into workflow.json: the per-stage summary and the samples, with node ids
        shortened to ``n1``, ``n2``, ... in order of first appearance (``node_ids`` maps them
        back).  A prefix would not do: the autoscaler's fake provider numbers its nodes
        ``fff...f00001``, ``fff...f00002``."""
        names: dict[str, str] = {}
        rows = sorted(self.rows, key=lambda r: r["t"])   # a stage's first sample may land late
        for r in rows:
            for n in r["alive"]:
                names.setdefault(n, f"n{len(names) + 1}")
        short = [{**r, "alive": [names[n] for n in r["alive"]],
                  "busy": {names.get(n, n): c for n, c in r["busy"].items()}} for r in rows]
        return {"interval_s": self.interval_s, "per_stage": self.per_stage(), "samples": short,
                "node_ids": {v: k for k, v in names.items()}}
