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
    # a value of the wrong kind names its key (not Python's "invalid literal for int()")
    for body, says in (("image_size: big\n", "stage.yaml.image_size: expected int, got 'big'"),
                       ("image_size: 96.5\n", "image_size: expected int, got 96.5"),
                       ("image_size: [96]\n", "image_size: expected int, got [96]"),
                       ("url_col: {a: 1}\n", "url_col: expected str, got {'a': 1}")):
        y.write_text(body)
        with pytest.raises(ValueError) as e:
            load(DataConfig, str(y))
        assert says in str(e.value), (body, str(e.value))
    y.write_text("image_size: 96.0\n")                  # a whole float is still an int
    assert load(DataConfig, str(y)).image_size == 96


def test_a_config_may_live_on_s3(s3):
    """``--config s3://...``: a job on a cluster names a config no node has on its disk (the
    stage loader and the workflow's run YAML read it the same way)."""
    from align_ray.workflow.config import load as load_run

    s3.create_bucket(Bucket="conf")
    s3.put_object(Bucket="conf", Key="data.yaml", Body=b"image_size: 96\nthreads: 4\n")
    cfg = load(DataConfig, "s3://conf/data.yaml", threads=8)
    assert cfg.image_size == 96 and cfg.threads == 8
    s3.put_object(Bucket="conf", Key="run.yaml", Body=b"output: s3://conf/run\ntrain: {steps: 3}\n")
    run = load_run("s3://conf/run.yaml", smoke=True)
    assert run.train.steps == 3 and run.train.output == "s3://conf/run/train"
    with pytest.raises(FileNotFoundError, match="s3://conf/missing.yaml"):
        load(DataConfig, "s3://conf/missing.yaml")
