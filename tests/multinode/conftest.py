"""Fixtures of the multi-node tests: one ``ray start`` cluster per module (tests/multinode/
cluster.py), the noisy web and the small training set of the other test folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.multinode.cluster import LocalCluster
from tests.train.conftest import small_parquet

__all__ = ["small_parquet", "cluster", "ensure"]  # small_parquet: a fixture used here too

# The cluster's processes take HOME from this environment: tests/conftest.py (loaded first)
# pointed it at a folder with ray_bootstrap_config.yaml, so no Ray start probes cloud metadata.
assert Path(os.environ["HOME"], "ray_bootstrap_config.yaml").exists()


@pytest.fixture(scope="module")
def cluster():
    """A head (CPU 0) plus ``cpu_worker`` and two ``gpu_train`` nodes (1 CPU each)."""
    c = LocalCluster()
    try:
        c.start_head()
        for typ in ("cpu_worker", "gpu_train", "gpu_train"):
            c.add(typ)
        yield c
    finally:
        c.shutdown()


def ensure(cluster: LocalCluster, **want: int) -> None:
    """Add worker nodes until ``want`` live nodes of each type run (earlier tests killed some)."""
    for typ, n in want.items():
        live = sum(1 for x in cluster.nodes if x.type == typ and not x.killed)
        for _ in range(n - live):
            cluster.add(typ)
