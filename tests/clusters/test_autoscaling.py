"""How the autoscaler will react to each pipeline stage, decided offline by Ray's own scheduler.

``ray.autoscaler._private.resource_demand_scheduler.get_nodes_for`` is the function the
autoscaler calls to turn pending resource demands (queued tasks/actors, placement-group bundles)
into "launch these node types".  Feeding it the resource shapes each stage asks for, against the
node types of clusters/aws.yaml, clusters/gcp.yaml and (through KubeRay's translation) the
RayCluster, checks the behaviour the README promises: download/filter scale the CPU workers,
training scales the A100 nodes, serving/index scale the L4 nodes, and CPU-only work can never
start an A100 node, even when it overflows the CPU pool (the autoscaler only *prefers* non-GPU
types for CPU work; the A100 type advertising CPU 0 is what makes it impossible).
Private Ray API, pinned to the installed Ray (2.60.0); no cloud or cluster is contacted.
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import (_default_utilization_scorer,
                                                               get_nodes_for)
from ray.autoscaler._private.util import prepare_config

from tests.clusters.conftest import KUBERAY_YAMLS, LAUNCHER_YAMLS, REPO, load

SCORER = functools.partial(_default_utilization_scorer,
                           node_availability_summary=NodeAvailabilitySummary({}))
L4 = {"accelerator_type:L4": 0.001}       # what accelerator_type="L4" adds to a request
A100 = {"accelerator_type:A100": 0.001}
ROLES = {"cpu": ("cpu_worker", "cpu"), "train": ("gpu_train", "gpu-train"),
         "serve": ("gpu_serve", "gpu-serve")}



def _stages() -> dict[str, tuple[list[dict], str]]:
    """Resource shapes per stage, sized from workflows/configs/cloud.yaml and clusters/serve.yaml."""
    cloud = yaml.safe_load((REPO / "workflows" / "configs" / "cloud.yaml").read_text())
    tr, ix = cloud["train"], cloud["index"]
    worker = {"GPU": 1, "CPU": tr["cpus_per_worker"]}
    serve = []
    for d in load("serve.yaml")["applications"][0]["deployments"]:
        opts = {k: v for k, v in d["ray_actor_options"].items() if k != "accelerator_type"}
        if d["ray_actor_options"].get("accelerator_type"):
            opts["accelerator_type:" + d["ray_actor_options"]["accelerator_type"]] = 0.001
        serve += [{"CPU": opts.pop("num_cpus"), **({"GPU": opts.pop("num_gpus")} if "num_gpus" in opts else {}),
                   **opts}] * d["autoscaling_config"]["min_replicas"]
    return {
        "download": ([{"CPU": 1}] * cloud["data"]["processes"], "cpu"),
        # the filter's shuffle: one CPU task per partition (align_ray/filter/shuffle.py)
        "filter": ([{"CPU": 1}] * cloud["filter"]["num_partitions"], "cpu"),
        "train_ingest": ([{"CPU": tr["data_cpus"]}] * tr["data_workers"], "cpu"),
        "train": ([worker] * tr["workers"], "train"),
        "train_pinned": ([{**worker, **A100}] * tr["workers"], "train"),   # + accelerator_type
        "index": ([{"CPU": ix["num_cpus"], "GPU": ix["num_gpus"]}] * ix["concurrency"], "serve"),
        "serve": (serve, "serve"),
    }


STAGES = _stages()


def _launcher(name: str):
    cfg = prepare_config(load(name))
    return cfg["available_node_types"], cfg["head_node_type"], cfg["max_workers"], 0


def _kuberay(_: str):
    doc = load(KUBERAY_YAMLS["RayCluster"])
    cfg = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "align-ray", "namespace": "default"}, "spec": doc["spec"]})
    return cfg["available_node_types"], cfg["head_node_type"], cfg["max_workers"], 1


CLUSTERS = {**{n: _launcher for n in LAUNCHER_YAMLS}, "kuberay/raycluster.yaml": _kuberay}


def plan(cluster: str, demand: list[dict], existing: dict[str, int] | None = None):
    """Node types (role names) the autoscaler would launch for `demand`, and what stays unmet."""
    types, head, max_workers, idx = CLUSTERS[cluster](cluster)
    role = {v[idx]: k for k, v in ROLES.items()}
    have = {head: 1, **{ROLES[r][idx]: n for r, n in (existing or {}).items()}}
    launch, unmet = get_nodes_for(types, have, head, max_workers, demand, SCORER)
    return {role[t]: n for t, n in launch.items() if n}, unmet


@pytest.fixture(autouse=True)
def quiet_scheduler(caplog):
    caplog.set_level(logging.ERROR, logger="ray.autoscaler")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_each_stage_scales_only_its_node_type(cluster, stage):
    demand, role = STAGES[stage]
    launched, unmet = plan(cluster, demand)
    assert set(launched) == {role}, f"{stage} on {cluster} launched {launched}"
    assert unmet == []


def _cpus_per_node(cluster: str, role: str) -> int:
    types, _, _, idx = CLUSTERS[cluster](cluster)
    return types[ROLES[role][idx]]["resources"]["CPU"]


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_sizes(cluster):
    actors = len(STAGES["download"][0])
    want = math.ceil(actors / _cpus_per_node(cluster, "cpu"))
    assert plan(cluster, STAGES["download"][0])[0] == {"cpu": want}     # one CPU per actor
    assert want <= 16
    assert plan(cluster, STAGES["train"][0])[0] == {"train": 2}         # 16 GPUs / 8 per node
    assert plan(cluster, STAGES["index"][0])[0] == {"serve": 8}         # one L4 per actor
    assert plan(cluster, STAGES["serve"][0])[0] == {"serve": 1}         # whole app on one L4


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_cpu_overflow_never_starts_an_a100_node(cluster):
    launched, unmet = plan(cluster, [{"CPU": 1}] * 2000, existing={"cpu": 16})
    assert "train" not in launched
    assert unmet, "beyond every CPU in the cluster the demand waits"


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_gpu_work_asking_for_cpus_stays_off_the_a100_nodes(cluster):
    # serving/index replicas ask for CPU too, so they never take (or start) a training node
    launched, _ = plan(cluster, [{"CPU": 1, "GPU": 1}] * 40)
    assert set(launched) == {"serve"}


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_a_cpu_task_does_not_start_a_gpu_node(cluster):
    assert plan(cluster, [{"CPU": 1}])[0] == {"cpu": 1}


def test_a_shape_no_node_has_is_reported_unmet():
    launched, unmet = plan("aws.yaml", [{"GPU": 16}])
    assert launched == {} and unmet == [{"GPU": 16}]
