"""One typed config per stage: defaults < YAML < flags; typos are errors."""

from __future__ import annotations

import pytest

from align_ray.config import load
from align_ray.data.config import DataConfig


def test_precedence_and_coercion(tmp_path):
    y = tmp_path / "stage.yaml"
    y.write_text("image_size: '128'\nthreads: 8\nallow_cidr: 127.0.0.0/8\nresolve: {a.test: 10.0.0.1}\n")
    cfg = load(DataConfig, str(y), threads=16, url_col=None)
    assert cfg.image_size == 128 and cfg.threads == 16 and cfg.url_col == "url"
    assert cfg.allow_cidr == ["127.0.0.0/8"] and cfg.resolve == {"a.test": "10.0.0.1"}


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    y = tmp_path / "stage.yaml"
    y.write_text("imagesize: 128\n")
    with pytest.raises(ValueError, match="unknown key.*imagesize"):
        load(DataConfig, str(y))
    with pytest.raises(ValueError, match="resize_mode"):
        load(DataConfig, None, resize_mode="stretch")
