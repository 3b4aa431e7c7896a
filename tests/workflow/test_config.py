"""RunConfig: presets, YAML sections (local.yaml, cloud.yaml), chaining of locations, errors,
and the script's argument parsing.  No Ray."""

from __future__ import annotations

import pytest
import yaml

from align_ray.workflow import config as wf
from align_ray.workflow.main import load_config, parse_args
from tests.conftest import REPO

CONFIGS = REPO / "workflows" / "configs"


def test_default_preset_is_the_embedded_tiny_run():
    cfg = wf.load()
    assert cfg.embedded and cfg.output == "out/end-to-end"
    assert "127.0.0.0/8" in cfg.data.allow_cidr          # the noisy web lives on loopback
    assert cfg.train.model.image_size == 64 and cfg.train.model.text_config["num_hidden_layers"] == 2
    assert cfg.train.val_fraction > 0                    # final retrieval metrics on held-out pairs
    assert cfg.filter.input == cfg.data.output == "out/end-to-end/data"
    assert cfg.train.data == [cfg.filter.output] == [cfg.index.data]
    assert cfg.index.model == cfg.serve.model == "out/end-to-end/train/model"
    assert cfg.serve.index == cfg.index.output


def test_smoke_is_smaller_than_default():
    d, s = wf.load(), wf.load(smoke=True)
    assert s.web.rows < d.web.rows and s.train.steps < d.train.steps
    assert s.train.batch_size <= 8 and s.output == "out/smoke"


def test_local_yaml_loads_as_an_embedded_run():
    cfg = wf.load(CONFIGS / "local.yaml")
    assert cfg.embedded and cfg.output == "out/local" and cfg.web.rows == 6000
    assert cfg.train.steps == 300 and cfg.train.model.embed_dim == 128   # tiny preset
    assert cfg.data.output == "out/local/data" and cfg.serve.index == "out/local/index"


def test_cloud_yaml_keeps_its_explicit_s3_locations():
    raw = yaml.safe_load((CONFIGS / "cloud.yaml").read_text())
    cfg = wf.load(CONFIGS / "cloud.yaml")
    assert not cfg.embedded and cfg.data.input == raw["data"]["input"]
    assert cfg.train.output == raw["train"]["output"] and cfg.train.workers == 16
    assert cfg.train.model.image_model == "efficientnet_b7"
    assert cfg.serve.image_encoder.num_gpus == 0.5 and cfg.serve.backend == "faiss"
    assert cfg.index.output == raw["index"]["output"]
    assert cfg.data.allow_cidr == []                     # no loopback exemption off the laptop


def test_overrides_win_and_chain_from_the_new_root(tmp_path):
    args = parse_args(["--smoke", "--output", "s3://bkt/run", "--port", "8123"])
    cfg = load_config(args)
    assert cfg.output == "s3://bkt/run" and cfg.data.output == "s3://bkt/run/data"
    assert cfg.train.output == "s3://bkt/run/train" and cfg.serve.port == 8123


@pytest.mark.parametrize("body, match", [
    ({"trian": {}}, "trian"),
    ({"train": {"use_gpus": True}}, "use_gpus"),
    ({"serve": {"image_encoder": {"replicas": 2}}}, "replicas"),
    ({"web": {"row": 5}}, "row"),
    ({"bootstrap": {"enabled": True, "filter": {"score_keep": 0.5}}}, "score_keep"),
    # a section that is not a mapping, at any depth, and a value of the wrong kind
    ({"train": [1, 2]}, r"run config\.train: expected a mapping, got list"),
    ({"train": {"model": 3}}, r"run config\.train\.model: expected a mapping, got int"),
    ({"bootstrap": {"enabled": True, "train": [1]}}, r"bootstrap\.train: expected a mapping"),
    ({"train": {"steps": "abc"}}, r"run config\.train\.steps: expected int, got 'abc'"),
])
def test_unknown_keys_are_errors(tmp_path, body, match):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(body))
    with pytest.raises(ValueError, match=match):
        wf.load(p)


def test_stages_argument_is_checked():
    assert parse_args(["--stages", "data,filter"]).stages == ["data", "filter"]
    with pytest.raises(SystemExit):
        parse_args(["--stages", "data,fliter"])


def test_bootstrap_chains_round_two_under_its_own_root_with_round_one_settings(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"output": "s3://bkt/run", "filter": {"min_side": 32},
                                 "train": {"steps": 77, "storage_path": "s3://bkt/ckpt"},
                                 "bootstrap": {"enabled": True}}))
    cfg = wf.load(p)
    b = cfg.bootstrap
    assert b.output == "s3://bkt/run/round2"
    # the round-1 model scores every downloaded row (the frequency rules then count the raw corpus)
    assert b.score.model == "s3://bkt/run/train/model" and b.score.input == cfg.data.output
    assert b.filter.input == b.score.output == "s3://bkt/run/round2/scored"
    # round 1's rules + the default score rule; round 1's budget, its own locations and run name
    assert b.filter.min_side == 32 and b.filter.score_keep_fraction == wf.DEFAULT_ROUND2_FILTER[
        "score_keep_fraction"] and b.filter.output == "s3://bkt/run/round2/filtered"
    assert b.train.steps == 77 and b.train.data == [b.filter.output]
    assert b.train.output == "s3://bkt/run/round2/train" and b.train.storage_path is None
    assert b.train.name == "align-round2" != cfg.train.name
    # the round-2 model is the one indexed and served, over what round 2 kept
    assert cfg.index.model == cfg.serve.model == "s3://bkt/run/round2/train/model"
    assert cfg.index.data == b.filter.output
    # round 1 is untouched
    assert cfg.train.data == [cfg.filter.output] and cfg.filter.score_keep_fraction is None


def test_bootstrap_overrides_and_off_by_default():
    assert not wf.load(smoke=True).bootstrap.enabled
    assert wf.load(smoke=True).index.model == "out/smoke/train/model"
    cfg = wf.load(smoke=True, overrides={"bootstrap": {
        "enabled": True, "filter": {"score_min": 0.2, "semdedup": True}, "train": {"steps": 3}}})
    f = cfg.bootstrap.filter
    assert f.score_min == 0.2 and f.score_keep_fraction is None and f.semdedup   # no default rule
    assert cfg.bootstrap.train.steps == 3 and cfg.train.steps == 8
    # a scorer trained elsewhere (DataComp's setting) is kept, not replaced by round 1's model
    ext = wf.load(smoke=True, overrides={"bootstrap": {"enabled": True,
                                                       "score": {"model": "/m/clip"}}})
    assert ext.bootstrap.score.model == "/m/clip" and not ext.bootstrap.score.fold_models


def test_round_two_stages_need_bootstrap(capsys):
    from align_ray.workflow.main import main

    args = parse_args(["--smoke"])
    assert not args.explicit_stages and "score" in args.stages   # left out at run time if off
    assert parse_args(["--smoke", "--bootstrap"]).bootstrap
    assert load_config(parse_args(["--smoke", "--bootstrap"])).bootstrap.enabled
    assert main(["--smoke", "--stages", "score,train2"]) == 2
    assert "round 2 is off" in capsys.readouterr().err
