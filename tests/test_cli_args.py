"""Flags generated from config dataclasses (align_ray/cli_args.py): names, types, choices and
help come from the fields, and only flags the user gave override the YAML."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from align_ray import cli_args
from align_ray import config as config_lib

MODES = ("fast", "exact")


@dataclass
class Sub:
    depth: int = 1


@dataclass
class Demo:
    """A demo stage.

    batch_size: rows per batch, counted
        per worker.
    lo/hi: the two ends.
    """

    input_path: str = ""                  # where the rows come from
    batch_size: int = 8
    ratio: float | None = None
    mode: str = field(default="fast", metadata={"choices": MODES})
    verbose: bool = False
    flip: bool = True
    tags: list[str] = field(default_factory=list)
    crop: tuple[float, float] = (0.5, 1.0)
    lo: int = 0
    hi: int = 9
    resolve: dict[str, str] = field(default_factory=dict)
    sub: Sub = field(default_factory=Sub)
    secret: str = field(default="", metadata={"help": "from metadata"})


def _parser(**kw) -> tuple[argparse.ArgumentParser, list[str]]:
    p = argparse.ArgumentParser()
    return p, cli_args.add_flags(p, Demo, **kw)


def test_flags_types_and_yaml_only_fields():
    p, added = _parser()
    assert "resolve" not in added and "sub" not in added        # mappings/sections: YAML only
    a = p.parse_args(["--input-path", "x", "--batch-size", "16", "--ratio", "0.5", "--mode",
                      "exact", "--verbose", "--no-flip", "--tags", "a", "--tags", "b",
                      "--crop", "0.2", "0.9"])
    assert cli_args.given(a, Demo) == {"input_path": "x", "batch_size": 16, "ratio": 0.5,
                                      "mode": "exact", "verbose": True, "flip": False,
                                      "tags": ["a", "b"], "crop": [0.2, 0.9]}
    assert cli_args.given(p.parse_args([]), Demo) == {}         # nothing given: YAML decides
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "slow"])                        # choices from MODES
    with pytest.raises(SystemExit):
        p.parse_args(["--batch-size", "many"])


def test_help_from_comment_docstring_metadata_and_override():
    p, _ = _parser(help={"lo": "overridden"}, aliases={"tags": "--tag"})
    text = " ".join(p.format_help().split())
    assert "where the rows come from" in text                   # trailing comment
    assert "rows per batch, counted per worker. (default: 8)" in text   # docstring + continuation
    assert "the two ends" in text and "overridden" in text and "from metadata" in text
    assert cli_args.given(p.parse_args(["--tag", "t"]), Demo) == {"tags": ["t"]}


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "demo.yaml"
    y.write_text("batch_size: 32\nmode: exact\nsub: {depth: 3}\n")
    p, _ = _parser()
    cfg = config_lib.load(Demo, str(y), **cli_args.given(p.parse_args(["--mode", "fast"]), Demo))
    assert (cfg.batch_size, cfg.mode, cfg.sub.depth, cfg.input_path) == (32, "fast", 3, "")
    y.write_text("sub: {depht: 3}\n")
    with pytest.raises(ValueError, match=r"sub: unknown key"):
        config_lib.load(Demo, str(y))


def test_stage_choices_are_the_module_constants():
    from align_ray.data.config import RESIZE_MODES, DataConfig
    from align_ray.serve.config import BACKENDS, ServeConfig

    for cls, dest, allowed in ((DataConfig, "resize_mode", RESIZE_MODES),
                               (ServeConfig, "backend", BACKENDS)):
        p = argparse.ArgumentParser()
        cli_args.add_flags(p, cls)
        (action,) = [a for a in p._actions if a.dest == dest]
        assert action.choices == list(allowed)
