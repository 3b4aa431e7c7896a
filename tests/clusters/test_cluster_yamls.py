"""Cluster-launcher YAMLs (clusters/aws.yaml, clusters/gcp.yaml), validated offline.

Validation is Ray's own: ``prepare_config`` (merges the provider's packaged defaults.yaml,
exactly what ``ray up`` does before it calls the cloud) and ``validate_config`` (the packaged
``ray/autoscaler/ray-schema.json`` via jsonschema, plus the head-type and min/max-worker checks).
Neither touches the network (the autouse ``offline`` fixture would fail the test); the steps of
``ray up`` that do (IAM/VPC/AMI bootstrap, instance-type resource auto-fill) are skipped, which is
why every node type states its ``resources`` explicitly.

Also pinned here: the image tags of every config (launcher and KubeRay) equal the installed Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.clusters.conftest import KUBERAY_YAMLS, LAUNCHER_YAMLS, PY_TAG, REPO, fresh, load

RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
WORKERS = ("cpu_worker", "gpu_train", "gpu_serve")
SPOT = {"cpu_worker": True, "gpu_train": False, "gpu_serve": True, "head": False}


def prepared(name: str) -> dict:
    return prepare_config(load(name))


def is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    sched = node_config.get("scheduling", {})
    return sched.get("provisioningModel") == "SPOT" or bool(sched.get("preemptible"))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_validates_with_rays_schema_and_validate_config(name):
    raw = load(name)
    jsonschema.validate(raw, RAY_SCHEMA)          # the file as written
    cfg = prepare_config(fresh(raw))              # defaults filled the way `ray up` does
    validate_config(cfg)
    assert cfg["provider"]["type"] == name.split(".")[0]
    # prepare_config merged our commands, not the provider defaults' `pip install ray` wheels
    assert all("ray-wheels" not in c for c in cfg["head_setup_commands"] + cfg["worker_setup_commands"])


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_node_types_scale_from_zero_with_a_cpu_only_head(name):
    cfg = prepared(name)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and set(types) == {"head", *WORKERS}
    head = types["head"]
    assert head["resources"] == {"CPU": 0}, "the head must not take stage work"
    assert head["max_workers"] == 0 and head["min_workers"] == 0
    for w in WORKERS:
        assert types[w]["min_workers"] == 0, f"{w} must scale from 0"
        assert types[w]["max_workers"] >= 1
    assert sum(types[w]["max_workers"] for w in WORKERS) == cfg["max_workers"]
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert types["cpu_worker"]["resources"]["CPU"] >= 8
    train, serve = types["gpu_train"]["resources"], types["gpu_serve"]["resources"]
    assert train["GPU"] == 8 and train["CPU"] == 0 and train["accelerator_type:A100"] == 1
    assert serve["GPU"] == 1 and serve["CPU"] >= 2 and serve["accelerator_type:L4"] == 1
    assert cfg["idle_timeout_minutes"] <= 10


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_spot_where_sensible_on_demand_for_head_and_training(name):
    cfg = prepared(name)
    provider = cfg["provider"]["type"]
    for node_type, want in SPOT.items():
        got = is_spot(provider, cfg["available_node_types"][node_type]["node_config"])
        assert got == want, f"{name}: {node_type} spot={got}, expected {want}"
    if provider == "gcp":   # GPU VMs cannot live-migrate and need the driver installed
        for w in ("gpu_train", "gpu_serve"):
            node = cfg["available_node_types"][w]["node_config"]
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
            assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_images_cpu_for_cpu_nodes_gpu_for_gpu_nodes(name):
    cfg = prepared(name)
    docker = cfg["docker"]
    assert docker["head_image"].endswith("-cpu") and docker["worker_image"].endswith("-cpu")
    types = cfg["available_node_types"]
    for w in WORKERS:
        image = types[w].get("docker", {}).get("worker_image", docker["worker_image"])
        wants_gpu = types[w]["resources"].get("GPU", 0) > 0
        assert image.endswith("-gpu" if wants_gpu else "-cpu"), f"{w}: {image}"


def _all_images() -> list[tuple[str, str]]:
    out = []
    for name in LAUNCHER_YAMLS:
        cfg = load(name)
        d = cfg["docker"]
        out += [(name, d[k]) for k in ("image", "head_image", "worker_image") if k in d]
        out += [(name, t["docker"]["worker_image"]) for t in cfg["available_node_types"].values()
                if "docker" in t]
    for rel in KUBERAY_YAMLS.values():
        text = (REPO / "clusters" / rel).read_text()
        out += [(rel, m) for m in re.findall(r"^\s*image:\s*(\S+)", text, re.M)]
    return out


def test_every_image_is_pinned_to_the_installed_ray_version():
    images = _all_images()
    assert len(images) >= 15
    pattern = re.compile(rf"rayproject/ray:{re.escape(ray.__version__)}-{PY_TAG}-(cpu|gpu)")
    for where, image in images:
        assert "ray-ml" not in image, f"{where}: rayproject/ray-ml is discontinued ({image})"
        assert pattern.fullmatch(image), f"{where}: {image} is not rayproject/ray:{ray.__version__}-{PY_TAG}-cpu|gpu"
    pins = re.findall(r"^ray(?:\[[^\]]*\])?==(\S+)", (REPO / "constraints.txt").read_text(), re.M)
    assert pins == [ray.__version__], "constraints.txt, the venv and the images must agree"
    for kind, rel in KUBERAY_YAMLS.items():
        spec = load(rel)["spec"]
        spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        assert spec["rayVersion"] == ray.__version__, f"{rel}: rayVersion"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_setup_installs_this_package_and_exports_s3_settings(name):
    cfg = prepared(name)
    assert cfg["file_mounts"]["~/align-ray"] == "."
    assert ".gitignore" in cfg["rsync_filter"], "without it the 6 GB .venv would be uploaded"
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "-c ~/align-ray/constraints.txt" in setup
    assert setup.rstrip().endswith("-e ~/align-ray")
    assert (REPO / "constraints.txt").exists()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = cfg[key][-1]
        assert start.index("export AWS_REGION=") < start.index("ray start"), key
        assert "#" not in start, f"{key}: a '#' in a folded command comments out the rest"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cfg["head_start_ray_commands"][-1]
    types = cfg["available_node_types"]
    if cfg["provider"]["type"] == "aws":   # workers get no IAM profile unless given one
        for w in WORKERS:
            assert "IamInstanceProfile" in types[w]["node_config"], w
    else:
        assert "~/.aws" in cfg["file_mounts"]
        assert any("google-api-python-client" in c for c in cfg["head_setup_commands"])


def test_offline_guard_is_active():
    import socket

    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("169.254.169.254", 80), timeout=1)


# ---- the validation can fail: mutated configs are rejected ----

def _mutations():
    def unknown_top_level(c):
        c["max_wrokers"] = 3

    def fractional_resources(c):
        c["available_node_types"]["gpu_serve"]["resources"]["GPU"] = 0.5

    def missing_node_config(c):
        del c["available_node_types"]["cpu_worker"]["node_config"]

    def unknown_node_type_key(c):
        c["available_node_types"]["cpu_worker"]["min_worker"] = 0

    def head_type_missing(c):
        c["head_node_type"] = "ray.head.default"

    def too_many_min_workers(c):
        c["available_node_types"]["cpu_worker"]["min_workers"] = 100

    def bad_docker_key(c):
        c["available_node_types"]["gpu_train"]["docker"]["image"] = "rayproject/ray:latest"

    return [unknown_top_level, fractional_resources, missing_node_config, unknown_node_type_key,
            head_type_missing, too_many_min_workers, bad_docker_key]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_mutated_launcher_yaml_is_rejected(name, mutate):
    cfg = load(name)
    mutate(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(cfg))
