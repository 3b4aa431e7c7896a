"""The shipped Serve config file, deployed the way ``serve deploy`` does it (the controller's
declarative ``apply_config``, which the dashboard's REST API calls), next to the package's
imperatively started app: it builds through ``app_builder``, answers, and a redeploy that only
changes an encoder's ``user_config`` is applied live to the running replica (no restart)."""

from __future__ import annotations

import copy
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from align_ray.serve.app import wait_running

YAML = Path(__file__).resolve().parents[2] / "align_ray" / "serve" / "serve_config.yaml"
APP = "align-declarative"


def _config(tiny_model: str, index_dir: str) -> dict:
    """serve_config.yaml with this test's model/index, its own route, and replicas sized for the
    4-CPU test cluster (the rest as shipped, user_config included)."""
    raw = yaml.safe_load(YAML.read_text())
    (app,) = raw["applications"]
    app.update(name=APP, route_prefix="/declarative")
    app["args"].update(model=tiny_model, index=index_dir)
    for d in app["deployments"]:
        d["ray_actor_options"] = {"num_cpus": 0.25}
        if "autoscaling_config" in d:
            d["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        else:
            d["num_replicas"] = 1
    return raw


def _deploy(raw: dict, timeout: float = 300) -> None:
    """``serve deploy``'s declarative apply, then a wait for RUNNING with the test's own
    deadline (``wait_running``; the Serve client's ``_blocking=True`` gives up after a fixed
    60 s, which new replicas overran on a slow CI runner)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(raw))
    wait_running(APP, timeout)


def _text_user_config(raw: dict) -> dict:
    (app,) = raw["applications"]
    return next(d for d in app["deployments"] if d["name"] == "TextEncoder")["user_config"]


def test_shipped_config_deploys_and_user_config_is_retuned_live(serve_app, tiny_model, index_dir,
                                                                  embedder):
    from ray import serve

    from align_ray.client import AlignClient

    client, _ = serve_app
    raw = _config(tiny_model, index_dir)
    shipped = _text_user_config(raw)
    _deploy(raw)
    try:
        api = AlignClient(client.base_url + "/declarative", timeout=60, retries=0)
        got = api.embed_text(["grinning face"])
        np.testing.assert_allclose(got, embedder.embed_texts(["grinning face"]), atol=1e-4)
        handle = serve.get_deployment_handle("TextEncoder", APP)
        before = handle.info.remote().result(timeout_s=60)
        assert before["max_batch_size"] == shipped["max_batch_size"]
        assert before["batch_wait_timeout_s"] == pytest.approx(shipped["batch_wait_timeout_s"])

        slow = copy.deepcopy(raw)
        _text_user_config(slow)["batch_wait_timeout_s"] = 0.5     # the throughput setting, exaggerated
        _deploy(slow)
        deadline = time.monotonic() + 60
        while (info := handle.info.remote().result(timeout_s=60))["batch_wait_timeout_s"] != 0.5:
            assert time.monotonic() < deadline, f"user_config not applied: {info}"
            time.sleep(0.5)
        assert info["pid"] == before["pid"]                        # same replica: no restart
        assert info["max_batch_size"] == shipped["max_batch_size"]  # the other knobs kept
        t = time.perf_counter()
        handle.embed.remote(["grinning face"]).result(timeout_s=60)
        assert time.perf_counter() - t >= 0.5      # a lone request waits out the batch window
    finally:
        serve.delete(APP)


def test_serve_controller_gives_a_starting_proxy_30_s(serve_app):
    """``app.start`` starts Serve's controller with ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=30``
    in its environment (Serve's 5 s default killed a proxy still importing on a loaded CI
    runner, and ``align-ray serve`` died in ``serve.start``).  Read from the controller
    process itself: the setting only works there."""
    import psutil

    want = os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")  # the user's wins
    seen = 0
    # this session's controller, and any other align-ray serve's on the box (the cluster half
    # of tests/run_all.sh runs some beside this one: one may end while it is read)
    for p in psutil.process_iter(["cmdline"]):
        if not (p.info["cmdline"] or [""])[0].startswith("ray::ServeController"):
            continue
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        assert env.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S") == want, p
        seen += 1
    assert seen


def test_an_app_that_cannot_fit_a_local_ray_is_refused_with_what_to_change():
    """``align-ray serve --index-shards 2`` with the default 0.5 CPU per replica asks 2.5 CPUs;
    on a 2-CPU local Ray (no autoscaler) Serve would wait for them forever.  ``check_fits``
    refuses it, naming every deployment's share; 0.25 CPU per shard fits."""
    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    cfg = ServeConfig.from_dict({"model": "m", "index_shards": 2})
    demand = app.startup_demand(cfg)
    assert {n: d["CPU"] for n, d in demand.items()} == {
        "ImageEncoder": 0.5, "TextEncoder": 0.5, "Router": 0.5, "IndexShard0": 0.5,
        "IndexShard1": 0.5}
    with pytest.raises(ValueError, match=r"needs 2.5 CPU .*IndexShard1 0.5.* has 2, "):
        app.check_fits(cfg, {"CPU": 2.0})
    app.check_fits(ServeConfig.from_dict({"model": "m", "index_shards": 2,
                                          "index_shard": {"num_cpus": 0.25}}), {"CPU": 2.0})
    app.check_fits(ServeConfig.from_dict({"model": "m"}), {"CPU": 2.0})    # the default fits
    # starting replicas count: initial_replicas, else min_replicas, at least one
    big = ServeConfig.from_dict({"model": "m", "text_encoder": {"initial_replicas": 2,
                                                               "max_replicas": 3},
                                 "image_encoder": {"min_replicas": 0, "num_gpus": 0.5}})
    demand = app.startup_demand(big)
    assert demand["TextEncoder"]["CPU"] == 1.0 and demand["ImageEncoder"]["GPU"] == 0.5
    with pytest.raises(ValueError, match="needs 0.5 GPU"):
        app.check_fits(big, {"CPU": 8.0})


def test_an_app_whose_replicas_never_place_is_deleted_after_its_deadline_saying_why(serve_app,
                                                                                    capsys):
    """Serve waits for RUNNING for ever; a replica no node can hold (here a GPU image encoder on
    this CPU-only cluster, as on a cluster whose autoscaler never adds the GPU node) would hang
    ``align-ray serve`` and the workflow.  ``app.start`` gives up after ``startup_timeout_s``,
    names the deployment, what it asks and what is free, and deletes the half-started app; the
    app beside it is untouched."""
    from ray import serve

    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    client, running = serve_app
    raw = running.to_dict()
    raw.update(app_name="align-unplaceable", route_prefix="/unplaceable", startup_timeout_s=5,
               # an unplaced replica is removed after its drain time: Serve's 20 s, here 1
               image_encoder={**raw["image_encoder"], "num_gpus": 1,
                              "graceful_shutdown_timeout_s": 1})
    t = time.monotonic()
    with pytest.raises(app.StartupTimeout) as err:
        app.start(ServeConfig.from_dict(raw))
    took = time.monotonic() - t
    msg = str(err.value)
    assert "did not start in 5 s" in msg and "ImageEncoder" in msg, msg
    assert "ImageEncoder UPDATING (1 starting; its starting replicas ask 0.1 CPU, 1 GPU)" in msg
    assert "Free in the cluster: " in msg and msg.endswith(" 0 GPU"), msg
    assert took < 30, took
    # on the way, what it waits on (every 30 s; here, half-way to the 5 s deadline)
    out = capsys.readouterr().out
    assert re.search(r"\[serve\] app 'align-unplaceable' starting for \d s, waiting on: "
                     r"ImageEncoder UPDATING", out), out
    assert "align-unplaceable" not in serve.status().applications
    assert client.healthz()["status"] == "ok"


def test_an_app_whose_replicas_fail_to_construct_fails_at_once(serve_app, tmp_path):
    """A model directory that exists but does not load: the encoders' constructors raise,
    Serve marks the app DEPLOY_FAILED, and ``app.start`` says so at once (``align-ray serve``
    exits 1) instead of waiting out ``startup_timeout_s``."""
    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    _, running = serve_app
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    raw = running.to_dict()
    raw.update(app_name="align-broken", route_prefix="/broken", model=str(broken), index=None,
               indexes={}, startup_timeout_s=600)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="deploying the Serve app 'align-broken' failed"):
        app.start(ServeConfig.from_dict(raw))
    print(f"failed after {time.monotonic() - t:.0f} s")
    assert time.monotonic() - t < 120
