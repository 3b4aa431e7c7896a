"""align_ray/train/resilience.py: a bounded wait for the worker group, side actors that never
fail a finished run."""

from __future__ import annotations

import time

import pytest

from align_ray.train import resilience


def test_failure_config_bounds_the_worker_group_wait(monkeypatch):
    monkeypatch.delenv(resilience.RAY_TRY_ENV, raising=False)
    monkeypatch.setattr(resilience, "_set_here", None)
    fc = resilience.failure_config(3, timeout_s=600)
    per_try = float(resilience.os.environ[resilience.RAY_TRY_ENV])
    assert per_try == 60 and fc.max_failures == 3
    assert (fc.controller_failure_limit + 1) * per_try == 600   # attempts x wait = the bound
    fc = resilience.failure_config(3, timeout_s=20)              # a short bound still allows
    per_try = float(resilience.os.environ[resilience.RAY_TRY_ENV])   # one failed start
    assert fc.controller_failure_limit >= 1
    assert (fc.controller_failure_limit + 1) * per_try == pytest.approx(20)
    assert resilience.failure_config(3, timeout_s=0).controller_failure_limit == -1  # for ever
    # an elastic group is sized from ready resources: shorter attempts, the same whole bound
    fc = resilience.failure_config(3, timeout_s=600, elastic=True)
    per_try = float(resilience.os.environ[resilience.RAY_TRY_ENV])
    assert per_try == resilience.ELASTIC_TRY_S < 60
    assert (fc.controller_failure_limit + 1) * per_try == 600


def test_a_users_own_per_attempt_wait_is_kept(monkeypatch):
    monkeypatch.setattr(resilience, "_set_here", None)
    monkeypatch.setenv(resilience.RAY_TRY_ENV, "100")
    fc = resilience.failure_config(0, timeout_s=600)
    assert resilience.os.environ[resilience.RAY_TRY_ENV] == "100"
    assert fc.controller_failure_limit == 5


def test_the_controller_polls_every_half_second_unless_the_user_says_otherwise(monkeypatch):
    from ray.train.v2._internal import constants

    # Ray Train copies the variable from the driver to its controller actor only if it is in
    # this set; a rename in Ray would silently bring back the 2 s default
    assert resilience.POLL_ENV == constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR
    assert resilience.POLL_ENV in constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(resilience.POLL_ENV, raising=False)
    resilience.controller_polls()
    assert float(resilience.os.environ[resilience.POLL_ENV]) == 0.5
    monkeypatch.setenv(resilience.POLL_ENV, "3")
    resilience.controller_polls()
    assert resilience.os.environ[resilience.POLL_ENV] == "3"


def test_only_a_start_timeout_becomes_train_stalled():
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    class Trainer:
        def __init__(self, err):
            self.err = err

        def fit(self):
            raise self.err

    with pytest.raises(resilience.TrainStalled, match=r"WAITS FOR 2 worker\(s\) x \{1 CPU\}"):
        resilience.fit(Trainer(ControllerError(WorkerGroupStartupTimeoutError(2))), 2,
                       {"CPU": 1.0}, timeout_s=20)
    with pytest.raises(ControllerError):  # other controller failures stay what they are
        resilience.fit(Trainer(ControllerError(RuntimeError("x"))), 2, {"CPU": 1.0})


def test_a_lost_counter_is_a_warning_not_a_failure(ray_cluster):
    import ray

    from align_ray.train.preprocess import BadImageCounter

    counter = BadImageCounter.options(scheduling_strategy=resilience.on_driver_node()).remote()
    counter.add.remote([1, 2, 2])
    assert resilience.read_count(counter, "test") == 2
    ray.kill(counter)  # what a node loss does to it
    # ray.kill is asynchronous: a call sent right after it can still be served, so wait
    # until calls fail (a lost node's actors are dead before anyone asks them).
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get(counter.count.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed counter never died"
        time.sleep(0.1)
    assert resilience.read_count(counter, "test") is None
