"""align_ray/cli.py: every subcommand's flags are its config's fields, the YAML sits between the
defaults and the flags, and a bad or incomplete config exits 2 before Ray starts."""

from __future__ import annotations

import pytest

from align_ray import cli


def _args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    cli._parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv, cls_path, expect", [
    (["data", "--resize-mode", "border", "--allow-private-network", "--allow-cidr", "10.0.0.0/8",
      "--threads", "4", "--retry-failed"], "align_ray.data.config:DataConfig",
     {"resize_mode": "border", "allow_private_network": True, "allow_cidr": ["10.0.0.0/8"],
      "threads": 4, "retry_failed": True}),
    (["filter", "--eval-set", "a", "--eval-set", "b", "--max-texts-per-image", "5",
      "--safety-hook", "m:f"], "align_ray.filter.config:FilterConfig",
     {"eval_sets": ["a", "b"], "max_texts_per_image": 5, "safety_hook": "m:f"}),
    (["train", "--data", "d", "--val-data", "v", "--use-gpu", "--lr", "0.1", "--optimizer",
      "lamb", "--crop-scale", "0.3", "1"], "align_ray.train.config:TrainConfig",
     {"data": ["d"], "val_data": ["v"], "use_gpu": True, "lr": 0.1, "optimizer": "lamb",
      "crop_scale": [0.3, 1.0]}),
    (["eval", "--template", "{}!", "--max-rows", "3", "--split-col", "s", "--split", "val"],
     "align_ray.train.eval_parquet:EvalConfig",
     {"templates": ["{}!"], "max_rows": 3, "split_col": "s", "split": "val"}),
    (["index", "--num-gpus", "0.5", "--limit", "7", "--no-thumbnails"],
     "align_ray.serve.config:IndexConfig", {"num_gpus": 0.5, "limit": 7, "thumbnails": False}),
    (["serve", "--backend", "faiss", "--port", "9"], "align_ray.serve.config:ServeConfig",
     {"backend": "faiss", "port": 9}),
])
def test_existing_flags_map_to_fields(argv, cls_path, expect):
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert cli.cli_args.given(_args(argv), cls) == expect


@pytest.mark.parametrize("argv", [["data", "--resize-mode", "stretch"],
                                  ["train", "--optimizer", "sgd"],
                                  ["serve", "--backend", "annoy"],
                                  ["filter", "--disabled-rules", "no_such_rule"]])
def test_choices_are_enforced_by_the_parser(argv):
    with pytest.raises(SystemExit):
        _args(argv)


def test_yaml_between_defaults_and_flags(tmp_path):
    from align_ray.filter.config import FilterConfig

    y = tmp_path / "f.yaml"
    y.write_text("input: in\noutput: out\nmin_side: 50\nmax_tokens: 9\n")
    cfg = cli._load(FilterConfig, _args(["filter", "--config", str(y), "--min-side", "70"]),
                    "input", "output")
    assert (cfg.input, cfg.min_side, cfg.max_tokens, cfg.max_aspect) == ("in", 70, 9, 3.0)


def test_missing_and_unknown_exit_2_before_ray(tmp_path, capsys):
    assert cli.main(["filter", "--input", str(tmp_path)]) == 2
    assert "--output required" in capsys.readouterr().err
    y = tmp_path / "f.yaml"
    y.write_text("min_sid: 3\n")
    assert cli.main(["filter", "--config", str(y), "--input", "a", "--output", "b"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert cli.main(["data", "--input", "x.csv", "--output", "o", "--filter",
                     "--filter-config", str(y)]) == 2        # checked before any download
    assert "unknown key" in capsys.readouterr().err


def test_an_output_that_takes_no_write_exits_2_before_ray(tmp_path, s3, capsys, monkeypatch):
    """Every stage that writes checks its output first (storage.check_writable): a local path
    under a regular file, or an S3 endpoint that does not answer, is one line and exit 2, not
    a traceback after Ray started.  A writable output is left as it was."""
    import ray

    from align_ray import storage

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = str(blocker / "out")
    was_up = ray.is_initialized()
    for argv in (["data", "--input", "urls.csv", "--output", bad],
                 ["filter", "--input", "in", "--output", bad],
                 ["score", "--model", "m", "--input", "in", "--output", bad],
                 ["train", "--data", "d", "--output", bad],
                 ["index", "--model", "m", "--data", "d", "--output", bad],
                 ["train", "--data", "d", "--output", "s3://bucket/run"]):
        with monkeypatch.context() as m:   # nothing listens on the discard port
            m.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"align-ray {argv[0]}: error: cannot write to {argv[-1]}: " in err, err
    assert ray.is_initialized() == was_up
    fresh = tmp_path / "a" / "b" / "out"
    storage.check_writable(str(fresh))                   # what it had to create, it removes
    assert not (tmp_path / "a").exists()
    s3.create_bucket(Bucket="writable")
    storage.check_writable("s3://writable/run")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="writable").get("Contents", [])]
    assert keys in ([], ["run/"]), keys   # Arrow's S3 keeps an emptied folder as a marker
