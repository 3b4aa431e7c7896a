"""Shared tiny fixtures for the model tests (64 px, 2-layer h=128 BERT, timm test_efficientnet)."""

from __future__ import annotations


import pyarrow.parquet as pq
import pytest

from align_ray.model import train_wordpiece
from tests.conftest import DEV_SET

DEV = DEV_SET


@pytest.fixture(scope="session")
def dev_rows() -> dict:
    if not DEV.exists():
        pytest.skip(f"{DEV} not present")
    tab = pq.read_table(DEV, columns=["image", "text"]).slice(0, 64)
    return {"image": tab.column("image").to_pylist(), "text": tab.column("text").to_pylist()}


@pytest.fixture(scope="session")
def tokenizer(dev_rows):
    return train_wordpiece(dev_rows["text"] * 4, vocab_size=500)


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny models: one intra-op thread is as fast and does not spin on a shared 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
