"""Building and running the Serve application.

``app_builder(args)`` is the import path a Serve config file names
(``import_path: align_ray.serve.app:app_builder``, ``args: {model: DIR, index: INDEX_DIR, ...}``,
any :class:`~align_ray.serve.config.ServeConfig` field).  ``align-ray serve`` calls :func:`run`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import HTTPOptions
from ray.serve.schema import ApplicationStatus, LoggingConfig

from align_ray.serve.config import EncoderConfig, ServeConfig
from align_ray.serve.encoders import ImageEncoder, TextEncoder
from align_ray.serve.router import Router
from align_ray.serve.shards import IndexShard

log = logging.getLogger(__name__)


def _abs(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def _model_spec(spec: str | None) -> str | None:
    """``--model`` for replicas in other processes: paths made absolute, an ``open_clip:`` spec
    kept whole (``_abs`` would make it ``/cwd/open_clip:...``), an open_clip folder named as one."""
    from align_ray.model.external import resolve_spec

    return resolve_spec(os.path.expanduser(spec)) if spec else spec


def _encoder_options(enc: EncoderConfig) -> dict[str, Any]:
    out = dict(autoscaling_config=enc.autoscaling_config(), ray_actor_options=enc.ray_actor_options(),
               max_ongoing_requests=enc.max_ongoing_requests, user_config=enc.user_config(),
               graceful_shutdown_timeout_s=enc.graceful_shutdown_timeout_s)
    if enc.max_replicas_per_node is not None:
        out["max_replicas_per_node"] = enc.max_replicas_per_node
    return out


def check_paths(cfg: ServeConfig) -> None:
    """Fail fast (before Ray starts) on a malformed model spec or a missing index directory,
    and on an index whose embedding dim is not the model's."""
    from align_ray.model.pretrained import check_model_spec
    from align_ray.serve.store import read_manifest

    if not cfg.model:
        raise ValueError("model is required (our save_pretrained dir, an HF dir or open_clip:ARCH:CKPT)")
    dim = check_model_spec(cfg.model)
    for name, path in cfg.index_map().items():
        meta = read_manifest(path)
        if dim is not None and int(dim) != int(meta["dim"]):
            raise ValueError(f"index {name} ({path}) has dim {meta['dim']}, model {cfg.model} has {dim}")


def build_app(cfg: ServeConfig) -> Application:
    """``Router.bind(ImageEncoder.bind(...), TextEncoder.bind(...), cfg, shards)`` with each
    encoder's own autoscaling, resources and batching; ``shards``: ``index_shards`` IndexShard
    deployments when > 1, each autoscaled on its own.  The indexes go in the Router's
    ``user_config`` (hot-swappable)."""
    from align_ray.serve import ingress

    # the cluster's environment chose the ingress (ingress.py); here, in the driver or, under
    # `serve deploy`, in Serve's controller, that environment is the cluster's
    ingress.check(cfg.ingress)
    cfg.model, cfg.index = _model_spec(cfg.model), _abs(cfg.index)
    cfg.indexes = {name: _abs(path) for name, path in cfg.indexes.items()}
    img = ImageEncoder.options(**_encoder_options(cfg.image_encoder)).bind(
        cfg.model, cfg.image_encoder.device, cfg.limits.max_pixels)
    txt = TextEncoder.options(**_encoder_options(cfg.text_encoder)).bind(
        cfg.model, cfg.text_encoder.device)
    router = Router.options(num_replicas=cfg.router.num_replicas,
                            ray_actor_options={"num_cpus": cfg.router.num_cpus},
                            max_ongoing_requests=cfg.router.max_ongoing_requests,
                            user_config=cfg.index_user_config())
    shards = []
    if cfg.index_shards > 1:
        # a shard keeps the indexes it was asked about; room for each name's old and new version
        keep = 2 * max(len(cfg.index_map()), 1) + 2
        shards = [IndexShard.options(name=f"IndexShard{i}", **cfg.index_shard.options()).bind(
                      i, cfg.index_shards, cfg.backend, cfg.faiss_factory, keep)
                  for i in range(cfg.index_shards)]
    return router.bind(img, txt, cfg, shards)


def app_builder(args: dict) -> Application:
    """Serve application builder: ``args`` are :class:`ServeConfig` fields (nested as dicts)."""
    return build_app(ServeConfig.from_dict(dict(args or {})))


# Serve's controller gives a new proxy 5 s to answer its first ready check, then kills it, and
# `serve.start` fails with "ActorDiedError ... ProxyActor ... killed by ray.kill": a proxy
# starting on a loaded node (a training run beside it, a 2-core box) can take longer than that
# to import its modules.  The controller reads the setting from its own environment, so it goes
# there; a value set by the user in this process's environment wins.
_CONTROLLER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S":
                   os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")}


def start(cfg: ServeConfig, access_log: bool = False, log_level: str = "WARNING") -> str:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` (Ray must be initialised) and deploy the
    app; returns its base URL once every deployment is running (:func:`wait_running`)."""
    serve.start(proxy_location=cfg.proxy_location,
                http_options=HTTPOptions(host=cfg.host, port=cfg.port),
                controller_options={"runtime_env": {"env_vars": _CONTROLLER_ENV}})
    # serve.run waits for RUNNING with no deadline: replicas that no node can hold (a GPU
    # encoder on a CPU cluster, an autoscaler that never adds the node) would hang the caller
    serve.run_many([serve.RunTarget(build_app(cfg), name=cfg.app_name,
                                    route_prefix=cfg.route_prefix,
                                    logging_config=LoggingConfig(enable_access_log=access_log,
                                                                 log_level=log_level))],
                   wait_for_applications_running=False)
    wait_running(cfg.app_name, cfg.startup_timeout_s, startup_demand(cfg))
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


class StartupTimeout(TimeoutError):
    """The app did not reach RUNNING in ``startup_timeout_s``; the message says what it waits on."""


def _word(state) -> str:
    return str(getattr(state, "value", state))


def _waiting_on(app, demand: dict[str, dict[str, float]] | None = None) -> str:
    """What each deployment not yet healthy waits on: its replica states, Serve's own message
    (after 30 s it names a replica's resources and the cluster's), what its starting replicas
    ask for (:func:`startup_demand`), and what the cluster has free now."""
    import ray

    out = []
    for name, dep in app.deployments.items():
        if _word(dep.status) != "HEALTHY":
            states = ", ".join(f"{n} {_word(s).lower()}" for s, n in dep.replica_states.items())
            asks = ", ".join(f"{v:g} {r}" for r, v in (demand or {}).get(name, {}).items() if v)
            out.append(f"{name} {_word(dep.status)} ({states or 'no replicas yet'}"
                       + (f"; its starting replicas ask {asks}" if asks else "") + ")"
                       + (f": {dep.message}" if dep.message else ""))
    free = ray.available_resources()
    return ("; ".join(out) or app.message or _word(app.status)) + ". Free in the cluster: " + \
        ", ".join(f"{free.get(r, 0.0):g} {r}" for r in ("CPU", "GPU"))


def wait_running(name: str, timeout_s: float, demand: dict[str, dict[str, float]] | None = None,
                 report_every_s: float = 30.0) -> None:
    """Wait until the Serve app ``name`` is RUNNING.  Says every ``report_every_s`` (at most half
    the deadline) what it waits on; after ``timeout_s`` deletes the app (nothing half-deployed
    keeps holding or asking for resources) and raises :class:`StartupTimeout`; a failed deploy
    raises RuntimeError.  ``demand``: :func:`startup_demand`, named in the report."""
    t0 = time.monotonic()
    report_every_s = min(report_every_s, timeout_s / 2)
    next_report = t0 + report_every_s
    while True:
        app = serve.status().applications.get(name)
        if app is None:
            raise RuntimeError(f"the Serve app {name!r} disappeared while starting (deleted or "
                               "replaced by another deploy)")
        if _word(app.status) == ApplicationStatus.RUNNING.value:
            return
        if _word(app.status) == ApplicationStatus.DEPLOY_FAILED.value:
            raise RuntimeError(f"deploying the Serve app {name!r} failed: {app.message}")
        now = time.monotonic()
        if now - t0 > timeout_s:
            waits = _waiting_on(app, demand)
            serve.delete(name)
            raise StartupTimeout(
                f"the Serve app {name!r} did not start in {timeout_s:g} s (startup_timeout_s), "
                f"so it was deleted. Still waiting on: {waits}")
        if now >= next_report:
            print(f"[serve] app {name!r} starting for {now - t0:.0f} s, waiting on: "
                  f"{_waiting_on(app, demand)}", flush=True)
            next_report = now + report_every_s
        time.sleep(0.5)


def startup_demand(cfg: ServeConfig) -> dict[str, dict[str, float]]:
    """CPUs / GPUs each deployment takes before the app can answer: its starting replicas
    (an encoder's ``initial_replicas``, else ``min_replicas``, at least 1; the Router's
    ``num_replicas``; each shard's ``min_replicas``, at least 1) times its resources."""
    def first(enc) -> int:
        return max(1, enc.initial_replicas if enc.initial_replicas is not None
                   else enc.min_replicas)

    out = {name: {"CPU": first(enc) * enc.num_cpus, "GPU": first(enc) * enc.num_gpus}
           for name, enc in (("ImageEncoder", cfg.image_encoder),
                             ("TextEncoder", cfg.text_encoder))}
    out["Router"] = {"CPU": cfg.router.num_replicas * cfg.router.num_cpus, "GPU": 0.0}
    if cfg.index_shards > 1:
        for i in range(cfg.index_shards):
            out[f"IndexShard{i}"] = {"CPU": max(1, cfg.index_shard.min_replicas)
                                     * cfg.index_shard.num_cpus, "GPU": 0.0}
    return out


def check_fits(cfg: ServeConfig, total: dict[str, float]) -> None:
    """Refuse, with what to change, an app that cannot start on a cluster of fixed size
    ``total``: Serve would wait for resources that never come (e.g. ``--index-shards 2`` with
    the default 0.5 CPU per replica asks 2.5 CPUs of a 2-CPU machine)."""
    demand = startup_demand(cfg)
    for res in ("CPU", "GPU"):
        need, have = sum(d[res] for d in demand.values()), float(total.get(res, 0.0))
        if need > have + 1e-9:
            parts = ", ".join(f"{n} {d[res]:g}" for n, d in demand.items() if d[res])
            raise ValueError(
                f"the app needs {need:g} {res} to start ({parts}) and this local Ray has "
                f"{have:g}, with no autoscaler to add more: lower num_cpus / num_gpus in the "
                "image_encoder, text_encoder, router or index_shard sections (--config YAML, "
                "e.g. `index_shard: {num_cpus: 0.25}`), or join a bigger cluster with "
                "--ray-address")


def run(cfg: ServeConfig, ray_address: str | None = None) -> int:
    """``align-ray serve``: deploy, print the URL, block until SIGINT/SIGTERM, shut Serve down.
    On a local Ray it starts itself, an app that cannot fit is refused (:func:`check_fits`)."""
    import ray

    from align_ray import ray_env

    check_paths(cfg)
    ray_env.init(ray_address)
    if ray_env.starts_local(ray_address):
        check_fits(cfg, ray.cluster_resources())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = start(cfg, access_log=True, log_level="INFO")
        print(f"align-ray serve: {url}/  (API: {url}/v1/..., health: {url}/healthz); Ctrl-C stops",
              flush=True)
        stop.wait()
    finally:
        serve.shutdown()
    return 0
