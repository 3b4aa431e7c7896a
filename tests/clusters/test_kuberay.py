"""KubeRay custom resources (clusters/kuberay/*.yaml), validated offline.

1. Each CR against its CRD's ``openAPIV3Schema`` (KubeRay v1.7.0, ``../shared/kuberay/``) with
   ``jsonschema``, in strict mode (unknown or misspelled fields are errors, as with
   ``kubectl apply --validate=strict``).  Not checked here, as the API server would: CEL rules,
   list-map uniqueness, ``format``, and the operator's webhook.
2. The cluster specs through KubeRay's own autoscaler translation
   (``ray.autoscaler._private.kuberay.autoscaling_config._derive_autoscaling_config_from_ray_cr``,
   what the in-tree autoscaler runs on the RayCluster it reads), which ends in ``validate_config``.
3. The RayJob's runtime env through ``ray.runtime_env.RuntimeEnv``.  (serveConfigV2: test_serve_configs.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.runtime_env import RuntimeEnv

from tests.clusters.conftest import KUBERAY_YAMLS, REPO, crd_errors, fresh, load

ENTRYPOINT = "python workflows/end_to_end.py --config workflows/configs/cloud.yaml"


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def autoscaler_view(doc: dict) -> dict:
    """The autoscaling config KubeRay's in-tree autoscaler derives from this cluster spec."""
    cr = {"metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
          "spec": fresh(cluster_spec(doc))}
    return _derive_autoscaling_config_from_ray_cr(cr)


@pytest.mark.parametrize("kind,rel", KUBERAY_YAMLS.items())
def test_cr_matches_the_crd_schema_strictly(kind, rel):
    docs = [d for d in yaml.safe_load_all((REPO / "clusters" / rel).read_text()) if d]
    assert len(docs) == 1
    doc = docs[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert crd_errors(doc, strict=True) == []


@pytest.mark.parametrize("kind,rel", KUBERAY_YAMLS.items())
def test_in_tree_autoscaling_with_groups_from_zero(kind, rel):
    doc = load(rel)
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["replicas"] == 0, g["groupName"]
        assert g["maxReplicas"] >= 1
    view = autoscaler_view(doc)           # raises if the autoscaler could not read it
    types = view["available_node_types"]
    assert types[view["head_node_type"]]["resources"]["CPU"] == 0
    workers = {k: v for k, v in types.items() if k != view["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU group"
    for name, t in workers.items():
        if t["resources"].get("GPU", 0) >= 8:
            assert t["resources"]["CPU"] == 0, f"{name}: training nodes must advertise CPU 0"


def test_raycluster_has_cpu_and_gpu_groups():
    groups = {g["groupName"]: g for g in load(KUBERAY_YAMLS["RayCluster"])["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu-train", "gpu-serve"}
    limits = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
    assert "nvidia.com/gpu" not in limits["cpu"]
    assert limits["gpu-train"]["nvidia.com/gpu"] == 8 and limits["gpu-serve"]["nvidia.com/gpu"] == 1


def test_rayjob_runs_the_workflow_on_the_raycluster_spec():
    job = load(KUBERAY_YAMLS["RayJob"])
    spec = job["spec"]
    assert spec["entrypoint"] == ENTRYPOINT
    assert (REPO / "workflows" / "configs" / "cloud.yaml").exists()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == load(KUBERAY_YAMLS["RayCluster"])["spec"], \
        "rayjob.yaml's rayClusterSpec must stay identical to raycluster.yaml's spec"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)                                      # Ray's own runtime-env validation
    assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")
    pkgs = env["pip"]["packages"]
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}" in pkgs
    assert any(p.startswith("-c ") and p.endswith("/constraints.txt") for p in pkgs)


def test_rayservice_cluster_is_the_serving_subset():
    svc = cluster_spec(load(KUBERAY_YAMLS["RayService"]))
    full = load(KUBERAY_YAMLS["RayCluster"])["spec"]
    assert svc["headGroupSpec"] == full["headGroupSpec"]
    serve_group = next(g for g in full["workerGroupSpecs"] if g["groupName"] == "gpu-serve")
    assert svc["workerGroupSpecs"] == [serve_group]


# ---- the validation can fail: mutated CRs are rejected ----

def _set(path: str, value):
    def mutate(doc):
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    mutate.__name__ = f"{path}={value!r}"
    return mutate


def _del(path: str):
    def mutate(doc):
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        del node[keys[-1]]
    mutate.__name__ = f"del {path}"
    return mutate


BAD = [
    ("RayCluster", _set("spec.workerGroupSpecs.0.maxReplicas", "16")),       # string, not int
    ("RayCluster", _set("spec.workerGroupSpecs.1.maxReplica", 2)),           # typo (strict)
    ("RayCluster", _del("spec.headGroupSpec")),                             # required
    ("RayCluster", _set("spec.enableInTreeAutoscaling", "true")),            # string, not bool
    ("RayCluster", _set("spec.workerGroupSpecs.2.template.spec.containers.0.resources.limits.memory",
                        "lots")),                                            # Quantity pattern
    ("RayJob", _set("spec.shutdownAfterJobFinishes", "yes")),
    ("RayJob", _set("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", [1, 2])),
    ("RayService", _set("spec.serveConfigV2", {"applications": []})),        # must be a string
    ("RayService", _set("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports.0"
                        ".containerPort", "6379")),
]


@pytest.mark.parametrize("kind,mutate", BAD, ids=lambda x: getattr(x, "__name__", x))
def test_mutated_cr_is_rejected(kind, mutate):
    doc = load(KUBERAY_YAMLS[kind])
    assert crd_errors(doc) == []
    mutate(doc)
    assert crd_errors(doc), f"{kind} accepted after {mutate.__name__}"


def test_typo_passes_lenient_mode_but_not_strict():
    doc = load(KUBERAY_YAMLS["RayCluster"])
    doc["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert crd_errors(doc, strict=False) == []
    assert any("minReplica" in e for e in crd_errors(doc, strict=True))


def test_autoscaler_rejects_an_unreadable_group():
    doc = load(KUBERAY_YAMLS["RayCluster"])
    doc["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = "two"
    with pytest.raises(ValueError, match="two"):
        autoscaler_view(doc)


def test_schemas_come_from_the_shared_kuberay_folder():
    from tests.clusters.conftest import _kuberay_dir

    readme = (_kuberay_dir() / "README.md").read_text()
    assert "v1.7.0" in readme and Path(_kuberay_dir() / "rayjob.v1.schema.json").exists()
