"""What keeps a training run alive, or makes it fail clearly, when cluster nodes die.

Three rules, found by killing worker nodes under a running ``align-ray train`` (issue 15):

* **Side actors live and die with the driver.**  A helper actor (the bad-image counter) placed
  wherever Ray likes can land on a worker node; when that node died, Ray Train restored the
  worker group and finished every step, and then the run failed on ``ActorDiedError`` reading
  the count.  :func:`on_driver_node` pins such an actor to the driver's node (hard affinity):
  Ray's own Train controller and Ray Data's split coordinator are pinned there the same way,
  so it dies only when the driver dies, i.e. with the run.  The driver runs on the head under
  ``ray job submit``; losing the head is out of scope (README, "Running on a cluster").  And
  :func:`read_count` never lets a lost helper fail a finished run: the count is a diagnostic.

* **Never wait for ever for a worker group.**  Ray Train V2 waits
  ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for the group's placement group, and then
  retries without end (``FailureConfig.controller_failure_limit`` defaults to -1): after losing
  nodes that no replacement comes for, a run waited silently for ever.  :func:`failure_config`
  bounds the whole wait by ``ALIGN_RAY_TRAIN_START_TIMEOUT_S`` (default 600 s: long enough for
  an autoscaler to bring a node, short enough to notice), and :func:`fit` turns the timeout into
  :class:`TrainStalled`, naming what the group waits for and what the cluster has; the CLI
  exits 3 on it, as for the Ray Data stages' watchdog.

  An elastic run waits less per attempt (``ELASTIC_TRY_S``).  Its controller sizes the group
  from the resources it sees ready, and right after a node dies that view can still count the
  dead node (the worker errors arrive before the GCS marks the node dead): the first restart
  then asks for a group that can never be placed, and with Ray's 60 s per attempt the shrink
  took a minute longer than it needed.  A group sized from ready resources is placed in well
  under a second when the view is right, so a short attempt loses nothing; the whole bound
  stays ``ALIGN_RAY_TRAIN_START_TIMEOUT_S``.  The view comes from Ray Data's autoscaling
  coordinator, which refreshes it every 20 s (a constant in Ray 2.60): attempts shorter than
  that only bound how long after the refresh the right-sized group is asked for.

* **The controller looks often.**  Ray Train's controller learns that the worker group finished,
  failed or lost a worker only when it next polls the workers, every
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default 2 s).  :func:`controller_polls` makes
  that 0.5 s unless the user set it: a finished run returns sooner and a dead worker is
  noticed sooner, for one small actor call per worker per poll (BENCHMARKS.md, "Ray Train's
  poll interval").
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from align_ray.watchdog import StageStalled

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "ALIGN_RAY_TRAIN_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 600.0
RAY_TRY_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train's wait per attempt
RAY_TRY_DEFAULT_S = 60.0
ELASTIC_TRY_S = 5.0  # the per-attempt wait of an elastic run (module doc)
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train's controller poll interval
POLL_S = 0.5
_set_here: str | None = None  # the per-attempt wait this module put in the environment


class TrainStalled(StageStalled):
    """The training worker group could not be placed within the start timeout."""


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Hard affinity to the node this driver runs on (see the module doc)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def read_count(actor: Any, what: str, timeout_s: float = 60.0) -> int | None:
    """``actor.count()``, or None (with a warning) when the actor is gone or does not answer:
    a diagnostic must never fail a run whose training finished."""
    try:
        return int(ray.get(actor.count.remote(), timeout=timeout_s))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        log.warning("train: the %s count is lost (%s: %s); training itself is complete",
                    what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def start_timeout_s() -> float:
    """``ALIGN_RAY_TRAIN_START_TIMEOUT_S``; <= 0 means wait for ever (Ray Train's default)."""
    return float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))


def failure_config(max_failures: int, timeout_s: float | None = None,
                   elastic: bool = False) -> ray.train.FailureConfig:
    """A ``FailureConfig`` whose waits for a worker group add up to about ``timeout_s``.

    Ray Train raises after ``controller_failure_limit + 1`` failed attempts of
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` each.  The per-attempt wait is set in this
    process's environment, which Ray Train copies to its controller actor.  At least two
    attempts fit in the bound, so one failed start (a node that dies while the group starts
    on it) does not end the run.  Ray counts these failures over the whole run, not per
    restart: a run that already had failed starts has less of the bound left."""
    timeout_s = start_timeout_s() if timeout_s is None else timeout_s
    if timeout_s <= 0:
        return ray.train.FailureConfig(max_failures=max_failures)
    global _set_here
    user = os.environ.get(RAY_TRY_ENV)
    if user is not None and user != _set_here:  # the user's own per-attempt wait wins
        per_try = float(user)
    else:
        per_try = min(ELASTIC_TRY_S if elastic else RAY_TRY_DEFAULT_S, timeout_s / 2)
        os.environ[RAY_TRY_ENV] = _set_here = f"{per_try:g}"
    limit = max(1, math.ceil(timeout_s / per_try) - 1)
    return ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=limit)


def controller_polls() -> None:
    """Ray Train's controller polls the workers every :data:`POLL_S` (module doc), unless the
    user set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``.  Set in this process's environment, which
    Ray Train copies to its controller actor."""
    os.environ.setdefault(POLL_ENV, f"{POLL_S:g}")


def _is_start_timeout(e: BaseException) -> bool:
    # matched by name: the class lives in Ray Train's private _internal package
    failure = getattr(e, "controller_failure", None)
    return type(failure).__name__ == "WorkerGroupStartupTimeoutError"


def cluster_summary() -> str:
    """Alive nodes and free/total CPU, GPU and custom resources, for error messages."""
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        free, total = ray.available_resources(), ray.cluster_resources()
    except Exception as e:  # noqa: BLE001 - the message must still come out
        return f"cluster state unknown ({type(e).__name__})"
    res = ", ".join(f"{free.get(k, 0):g}/{v:g} {k}" for k, v in sorted(total.items())
                    if not k.startswith(("node:", "memory", "object_store_memory")))
    return f"{len(nodes)} alive node(s); free/total: {res or 'nothing'}"


def fit(trainer: Any, workers: int, resources: dict[str, float],
        timeout_s: float | None = None) -> Any:
    """``trainer.fit()``, with a worker group that cannot be placed in time turned into
    :class:`TrainStalled` (a clear message instead of Ray Train's endless retries)."""
    try:
        return trainer.fit()
    except Exception as e:
        if not _is_start_timeout(e):
            raise
        timeout_s = start_timeout_s() if timeout_s is None else timeout_s
        need = ", ".join(f"{v:g} {k}" for k, v in resources.items() if v)
        raise TrainStalled(
            f"align-ray train: WAITS FOR {workers} worker(s) x {{{need}}}: the training worker "
            f"group could not be placed for about {timeout_s:g} s ({START_TIMEOUT_ENV}); "
            f"{cluster_summary()}.  Nodes were lost and none replaced them, or the cluster is "
            "too small: add nodes (or let the autoscaler do it) or lower --workers / "
            "--cpus-per-worker, then rerun with the same --output/--name to resume from the "
            "last checkpoint.") from e
