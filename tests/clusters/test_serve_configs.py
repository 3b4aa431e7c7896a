"""Serve configs: clusters/serve.yaml (``serve deploy`` on the launcher clusters) and the
``serveConfigV2`` string inside clusters/kuberay/rayservice.yaml, both parsed with
``ray.serve.schema.ServeDeploySchema`` (what ``serve deploy`` and KubeRay's Serve controller
accept) and each deployment's ``autoscaling_config`` with ``ray.serve.config.AutoscalingConfig``.
The app builder's ``args`` are checked against align-ray's own ``ServeConfig`` (unknown keys are
an error there too).
"""

from __future__ import annotations

import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema,
                              ServeDeploySchema)

from align_ray.serve.config import ServeConfig
from tests.clusters.conftest import KUBERAY_YAMLS, load

IMPORT_PATH = "align_ray.serve.app:app_builder"
ENCODERS = ("ImageEncoder", "TextEncoder")


def serve_yaml() -> dict:
    return load("serve.yaml")


def service_config() -> dict:
    text = load(KUBERAY_YAMLS["RayService"])["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def unknown_keys(cfg: dict) -> list[str]:
    """Keys that no Serve schema field takes.  ServeDeploySchema itself IGNORES them (pydantic
    ``extra="ignore"``), so a typo such as ``autoscaling:`` would silently deploy defaults."""
    bad = [k for k in cfg if k not in ServeDeploySchema.model_fields]
    for app in cfg.get("applications", []):
        bad += [f"app.{k}" for k in app if k not in ServeApplicationSchema.model_fields]
        for dep in app.get("deployments", []):
            bad += [f"{dep.get('name')}.{k}" for k in dep if k not in DeploymentSchema.model_fields]
            bad += [f"{dep.get('name')}.ray_actor_options.{k}" for k in dep.get("ray_actor_options", {})
                    if k not in RayActorOptionsSchema.model_fields]
            bad += [f"{dep.get('name')}.autoscaling_config.{k}" for k in dep.get("autoscaling_config", {})
                    if k not in AutoscalingConfig.model_fields]
    return bad


def parse(cfg: dict) -> ServeDeploySchema:
    """ServeDeploySchema validation plus a strict check for keys Serve would ignore."""
    schema = ServeDeploySchema.model_validate(cfg)
    bad = unknown_keys(cfg)
    if bad:
        raise ValueError(f"keys no Serve schema field takes: {bad}")
    return schema


CONFIGS = {"serve.yaml": serve_yaml, "rayservice serveConfigV2": service_config}


@pytest.mark.parametrize("name", CONFIGS)
def test_parses_with_serve_deploy_schema(name):
    schema = parse(CONFIGS[name]())
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    assert {"model", "index"} <= set(app.args)
    assert all(str(app.args[k]).startswith("s3://") for k in ("model", "index"))
    assert sorted(d.name for d in app.deployments) == ["ImageEncoder", "Router", "TextEncoder"]


@pytest.mark.parametrize("name", CONFIGS)
def test_independent_autoscaling_and_gpu_fractions(name):
    (app,) = CONFIGS[name]()["applications"]
    deps = {d["name"]: d for d in app["deployments"]}
    scalers = {}
    for dep_name, dep in deps.items():
        assert "num_replicas" not in dep, f"{dep_name}: autoscaling, not a fixed replica count"
        scalers[dep_name] = AutoscalingConfig(**dep["autoscaling_config"])
        assert scalers[dep_name].min_replicas >= 1, "serve keeps min replicas up"
        assert scalers[dep_name].target_ongoing_requests < dep["max_ongoing_requests"]
    img, txt = (scalers[n] for n in ENCODERS)
    assert (img.min_replicas, img.max_replicas, img.target_ongoing_requests) != \
        (txt.min_replicas, txt.max_replicas, txt.target_ongoing_requests), \
        "the two encoders should scale on their own settings"
    gpus = {n: deps[n]["ray_actor_options"]["num_gpus"] for n in ENCODERS}
    assert all(0 < g < 1 for g in gpus.values()), gpus
    assert sum(gpus.values()) <= 1, "one ImageEncoder and one TextEncoder should share a GPU"
    for n in ENCODERS:
        opts = deps[n]["ray_actor_options"]
        assert opts["num_cpus"] > 0, f"{n}: CPU > 0 keeps it off the CPU-0 training nodes"
        assert opts.get("accelerator_type") == "L4"
    assert deps["Router"]["ray_actor_options"].get("num_gpus", 0) == 0
    # the app builder must be told the same fractions, or it would load the models on CPU
    for n, key in zip(ENCODERS, ("image_encoder", "text_encoder")):
        assert app["args"][key]["num_gpus"] == gpus[n]


def test_serve_yaml_listens_on_all_interfaces():
    assert serve_yaml()["http_options"]["host"] == "0.0.0.0"


def test_rayservice_app_equals_serve_yaml_plus_runtime_env():
    (k8s,) = service_config()["applications"]
    (vm,) = serve_yaml()["applications"]
    env = k8s.pop("runtime_env")
    assert k8s == vm
    assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")


@pytest.mark.parametrize("name", CONFIGS)
def test_args_are_valid_align_ray_serve_config(name):
    (app,) = CONFIGS[name]()["applications"]
    cfg = ServeConfig.from_dict(app["args"])
    assert cfg.image_encoder.num_gpus > 0 and cfg.text_encoder.num_gpus > 0


# ---- the validation can fail ----

def _fixed_and_autoscaling(cfg):
    cfg["applications"][0]["deployments"][0]["num_replicas"] = 2


def _unknown_deployment_key(cfg):       # caught by parse()'s strict key check, not by Serve
    cfg["applications"][0]["deployments"][1]["autoscaling"] = {"min_replicas": 1}


def _unknown_autoscaling_key(cfg):
    cfg["applications"][0]["deployments"][0]["autoscaling_config"]["target_num_ongoing"] = 4


def _duplicate_route(cfg):
    cfg["applications"].append(dict(cfg["applications"][0], name="copy"))


def _bad_gpu_type(cfg):
    cfg["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = "half"


def _no_import_path(cfg):
    del cfg["applications"][0]["import_path"]


@pytest.mark.parametrize("mutate", [_fixed_and_autoscaling, _unknown_deployment_key,
                                    _unknown_autoscaling_key, _duplicate_route, _bad_gpu_type,
                                    _no_import_path],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("name", CONFIGS)
def test_mutated_serve_config_is_rejected(name, mutate):
    cfg = CONFIGS[name]()
    parse(cfg)
    mutate(cfg)
    with pytest.raises(Exception) as err:
        parse(cfg)
    assert "ValidationError" in type(err.value).__name__ or isinstance(err.value, ValueError)


def test_serve_schema_alone_ignores_unknown_keys():
    """Why parse() adds its own key check: Serve's schema accepts the typo silently."""
    cfg = serve_yaml()
    _unknown_deployment_key(cfg)
    ServeDeploySchema.model_validate(cfg)
    assert unknown_keys(cfg) == ["TextEncoder.autoscaling"]


def test_inverted_autoscaling_bounds_are_rejected():
    dep = serve_yaml()["applications"][0]["deployments"][0]
    bad = dict(dep["autoscaling_config"], min_replicas=9, max_replicas=2)
    with pytest.raises(ValueError):
        AutoscalingConfig(**bad)
