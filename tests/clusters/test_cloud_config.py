"""workflows/configs/cloud.yaml: each section is a valid stage config, and its resource shapes
fit the node types of the cluster configs (so the run it documents would actually schedule).
"""

from __future__ import annotations

import pytest
import yaml

from align_ray import config as config_lib
from align_ray.data.config import DataConfig
from align_ray.filter.config import FilterConfig
from align_ray.serve.config import IndexConfig, ServeConfig
from align_ray.train.config import TrainConfig
from tests.clusters.conftest import REPO, load

CLOUD = REPO / "workflows" / "configs" / "cloud.yaml"
SECTIONS = {"data": DataConfig, "filter": FilterConfig, "train": TrainConfig,
            "index": IndexConfig, "serve": ServeConfig}


def cloud() -> dict:
    return yaml.safe_load(CLOUD.read_text())


def build(section: str, data: dict):
    """The stage config, by the loader ``--config`` uses (the project's own modules are imported
    at the top: a renamed one fails this file instead of skipping it)."""
    return config_lib.from_dict(SECTIONS[section], data, source=f"cloud.yaml:{section}")


def test_has_exactly_the_stage_sections():
    assert set(cloud()) == set(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_section_is_a_valid_stage_config(section):
    build(section, cloud()[section])


@pytest.mark.parametrize("section", SECTIONS)
def test_every_location_is_on_s3(section):
    body = cloud()[section]
    for key in ("input", "output", "model", "index", "storage_path", "data"):
        values = body.get(key)
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, str):
                assert v.startswith("s3://YOUR_BUCKET/"), f"{section}.{key}: {v}"


def test_stages_chain_output_to_input():
    c = cloud()
    assert c["filter"]["input"] == c["data"]["output"]
    assert c["train"]["data"] == [c["filter"]["output"]]
    assert c["index"]["data"] == c["filter"]["output"]
    assert c["index"]["model"] == c["serve"]["model"] == c["train"]["output"] + "/model"
    assert c["serve"]["index"] == c["index"]["output"]


def test_model_is_efficientnet_b7_and_bert_base():
    train = build("train", cloud()["train"])
    assert train.model.image_model == "efficientnet_b7"
    assert train.model.text_model == "bert-base-uncased"
    assert train.use_gpu and train.workers == 16 and train.global_batch >= 2048
    assert train.storage_path.startswith("s3://")


def test_resource_shapes_fit_the_cluster_node_types():
    c = cloud()
    types = load("aws.yaml")["available_node_types"]
    assert c["train"]["cpus_per_worker"] == types["gpu_train"]["resources"]["CPU"] == 0
    per_node = types["gpu_train"]["resources"]["GPU"]
    assert c["train"]["workers"] <= per_node * types["gpu_train"]["max_workers"]
    assert c["data"]["processes"] > 0, "0 would size the download from an empty cluster"
    assert c["data"]["processes"] <= types["cpu_worker"]["resources"]["CPU"] * types["cpu_worker"]["max_workers"]
    assert c["index"]["num_cpus"] > 0 and c["index"]["num_gpus"] > 0
    assert c["index"]["concurrency"] <= types["gpu_serve"]["max_workers"]


def test_serve_section_matches_the_deployed_serve_config():
    args = load("serve.yaml")["applications"][0]["args"]
    s = cloud()["serve"]
    for key in ("model", "index", "backend", "faiss_factory"):
        assert s[key] == args[key], key
    for enc in ("image_encoder", "text_encoder"):
        assert s[enc]["num_gpus"] == args[enc]["num_gpus"]


def test_an_unknown_key_is_rejected():
    body = dict(cloud()["train"], use_gpus=True)
    with pytest.raises(ValueError, match="use_gpus"):
        build("train", body)
