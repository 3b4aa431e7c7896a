"""ModelConfig: presets, validation, dict/YAML round trips."""

from __future__ import annotations

import json

import pytest

from align_ray import config as config_loader
from align_ray.model import ModelConfig


def test_presets_say_which_temperature():
    assert ModelConfig().temperature_init == 1.0  # ALIGN-faithful default
    tiny = ModelConfig.tiny()
    assert (tiny.image_model, tiny.image_size, tiny.embed_dim, tiny.temperature_init) == ("efficientnet_b0", 64, 128, 0.07)
    assert tiny.text_config["num_hidden_layers"] == 2 and tiny.text_config["hidden_size"] == 128
    assert ModelConfig.tiny(temperature_init=1.0).temperature_init == 1.0
    align = ModelConfig.align()
    assert align.temperature_init == 1.0 and not align.project_image and align.embed_dim == 1280
    assert "0.07" in ModelConfig.__doc__ and "1.0" in ModelConfig.__doc__


def test_validation():
    with pytest.raises(ValueError, match="loss"):
        ModelConfig(loss="triplet")
    with pytest.raises(ValueError, match="temperature_min"):
        ModelConfig(temperature_min=0.0)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"image_modle": "x"})


def test_dict_json_and_yaml_round_trips(tmp_path):
    cfg = ModelConfig.tiny(image_mean=(0.5, 0.5, 0.5), image_std=[0.25, 0.25, 0.25], loss="siglip")
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.image_std == (0.25, 0.25, 0.25)
    yml = tmp_path / "m.yaml"
    yml.write_text("image_model: test_efficientnet\nimage_size: 64\ntemperature_init: 0.07\n"
                   "text_config: {hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 2}\n"
                   "image_mean: [0.5, 0.5, 0.5]\n")
    loaded = config_loader.load(ModelConfig, str(yml), embed_dim=32)
    assert loaded.image_model == "test_efficientnet" and loaded.embed_dim == 32
    assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.text_config["hidden_size"] == 64
