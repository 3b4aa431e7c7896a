"""ServeConfig / IndexConfig parsing and the shipped Serve config YAML (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align_ray.serve.config import EncoderConfig, IndexConfig, ServeConfig

YAML = Path(__file__).resolve().parents[2] / "align_ray" / "serve" / "serve_config.yaml"


def test_nested_sections_and_defaults():
    cfg = ServeConfig.from_dict({"model": "m", "port": "9000",
                                 "text_encoder": {"max_replicas": 5, "num_cpus": 0.25},
                                 "limits": {"max_k": 50}})
    assert cfg.port == 9000 and cfg.host == "127.0.0.1"
    assert cfg.text_encoder.max_replicas == 5 and cfg.image_encoder.max_replicas == 2
    assert cfg.text_encoder.autoscaling_config()["max_replicas"] == 5
    assert cfg.text_encoder.ray_actor_options() == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert cfg.limits.max_k == 50 and cfg.limits.max_texts == 64
    assert ServeConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"colour": 1}, "unknown key"),
    ({"limits": {"max_kk": 1}}, r"limits: unknown key"),
    ({"image_encoder": {"max_batch_size": 64, "max_ongoing_requests": 8}}, "batches can form"),
    ({"text_encoder": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"backend": "annoy"}, "backend"),
    ({"text_encoder": {"gil_switch_interval_s": 0}}, "gil_switch_interval_s"),
    ({"router": 3}, "expected a mapping"),
    ({"image_encoder": {"graceful_shutdown_timeout_s": -1}}, "graceful_shutdown_timeout_s"),
    ({"startup_timeout_s": 0}, "startup_timeout_s must be > 0"),
    ({"index_shard": {"target_ongoing_requests": 0}}, "index_shard: need 0 < target"),
])
def test_invalid_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig.from_dict(bad)


@pytest.mark.parametrize("shard, in_flight", [
    ({}, 2), ({"max_replicas": 4}, 4), ({"target_ongoing_requests": 8}, 16),
    ({"max_replicas": 3, "target_ongoing_requests": 0.5}, 2)])
def test_the_router_keeps_enough_shard_batches_out_to_reach_max_replicas(shard, in_flight):
    """Serve asks ongoing / target replicas: a Router with every batch slot busy asks for
    ``max_replicas`` of each shard (and no fewer than one batch is ever out)."""
    cfg = ServeConfig.from_dict({"index_shards": 2, "index_shard": shard}).index_shard
    assert cfg.batches_in_flight() == in_flight
    target = cfg.options()["autoscaling_config"]["target_ongoing_requests"]
    assert -(-in_flight // target) >= cfg.max_replicas


def test_gpu_fraction_selects_cuda():
    cfg = ServeConfig.from_dict({"image_encoder": {"num_gpus": 0.25}})
    assert cfg.image_encoder.device == "cuda" and cfg.text_encoder.device == "cpu"


def test_shipped_yaml_validates_with_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(YAML.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "align_ray.serve.app:app_builder"
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"ImageEncoder", "TextEncoder", "Router"}
    img, txt = deps["ImageEncoder"].autoscaling_config, deps["TextEncoder"].autoscaling_config
    assert img["max_replicas"] != txt["max_replicas"]          # set independently
    for d in (deps["ImageEncoder"], deps["TextEncoder"]):
        assert d.max_ongoing_requests >= d.user_config["max_batch_size"]
        assert set(d.user_config) == set(EncoderConfig().user_config())   # every live knob set
        assert d.autoscaling_config["target_ongoing_requests"] < d.max_ongoing_requests
    # the app's args are a valid ServeConfig too
    cfg = ServeConfig.from_dict(app.args)
    assert cfg.model and cfg.index


def test_app_builder_builds_the_three_deployments(tmp_path):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from align_ray.serve.app import app_builder

    app = call_user_app_builder_with_args_if_necessary(
        app_builder, {"model": str(tmp_path), "text_encoder": {"max_replicas": 3}})
    names = set()
    node = app._bound_deployment
    names.add(node.name)
    for arg in node.init_args:
        if hasattr(arg, "_bound_deployment"):
            dep = arg._bound_deployment
            names.add(dep.name)
            if dep.name == "TextEncoder":
                assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert names == {"Router", "ImageEncoder", "TextEncoder"}


def test_index_config_checks():
    assert IndexConfig(model="m", data="d", output="o").concurrency is None   # sized to the cluster
    with pytest.raises(ValueError):
        IndexConfig(batch_size=0)
    with pytest.raises(ValueError, match="limit must be >= 1"):   # not "every row"
        IndexConfig(limit=0)
