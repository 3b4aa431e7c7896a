"""Fixtures of the multi-node tests: one ``ray start`` cluster for the package (tests/multinode/
cluster.py), the noisy web and the small training set of the other test folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.multinode.cluster import LocalCluster
from tests.serve.conftest import corpus, tiny_model
from tests.train.conftest import small_parquet

# fixtures of other folders used here too: small_parquet, and the serve tests' tiny model and
# corpus
__all__ = ["small_parquet", "corpus", "tiny_model", "cluster", "ensure"]

# The cluster's processes take HOME from this environment: tests/conftest.py (loaded first)
# pointed it at a folder with ray_bootstrap_config.yaml, so no Ray start probes cloud metadata.
assert Path(os.environ["HOME"], "ray_bootstrap_config.yaml").exists()


@pytest.fixture(scope="package")
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
