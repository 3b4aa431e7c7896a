"""align_ray/train/run.py: a run is sized to the cluster it gets, never over-subscribed."""

from __future__ import annotations

import pytest

from align_ray.train.config import TrainConfig
from align_ray.train.run import cpus_needed, fit_to_cluster


def test_defaults_shrink_to_fit_two_cpus():
    cfg = TrainConfig(data=["d"], output="o")
    assert cpus_needed(cfg) > 2                       # 2 workers x 1 + 2 data tasks x 1
    fit_to_cluster(cfg, cluster_cpus=2)
    assert 1.99 <= cpus_needed(cfg) <= 2
    assert cfg.cpus_per_worker == pytest.approx(cfg.data_cpus)   # shrunk in proportion
    assert cfg.workers == 2 and cfg.global_batch == 2 * cfg.batch_size   # the objective is kept


def test_a_cluster_that_fits_or_is_still_scaling_up_is_left_alone():
    cfg = TrainConfig(data=["d"], output="o")
    fit_to_cluster(cfg, cluster_cpus=16)
    assert (cfg.cpus_per_worker, cfg.data_cpus) == (1.0, 1.0)
    fit_to_cluster(cfg, cluster_cpus=0)               # a CPU-0 head before the autoscaler acts
    assert (cfg.cpus_per_worker, cfg.data_cpus) == (1.0, 1.0)
