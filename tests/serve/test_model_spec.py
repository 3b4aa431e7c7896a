"""``--model`` reaches the Serve replicas and the index manifest as the spec it is: an
``open_clip:`` spec whole (an ``os.path.abspath`` made it ``/cwd/open_clip:...``), its paths
absolute, and a fine-tuned open_clip folder named as ``open_clip:local-dir:DIR``."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from align_ray.serve import app, index
from align_ray.serve.config import IndexConfig, ServeConfig
from tests.model.external_models import OPEN_CLIP_CFG, build_open_clip, captions, png


def test_serve_app_keeps_open_clip_specs_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig(model="open_clip:cfg/tiny.json:ckpt/tiny.pt", index="idx")
    app.build_app(cfg)  # binds the deployments (no Ray needed) with cfg.model as replicas get it
    assert cfg.model == f"open_clip:{tmp_path}/cfg/tiny.json:{tmp_path}/ckpt/tiny.pt"
    assert cfg.index == f"{tmp_path}/idx"
    folder = tmp_path / "ft"  # what train --init-from open_clip:... saves
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    cfg = ServeConfig(model="ft")
    app.build_app(cfg)
    assert cfg.model == f"open_clip:local-dir:{folder}"


def test_index_manifest_records_the_real_spec(ray_cluster, tmp_path, monkeypatch):
    spec = build_open_clip(tmp_path / "oc")
    monkeypatch.chdir(tmp_path)
    relative = spec.replace(f"{tmp_path}/", "")  # open_clip:oc/tiny-clip-test.json:oc/tiny.pt
    assert relative != spec
    data = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"image": [png(i) for i in range(4)], "text": captions(4)}), data)
    manifest = index.build(IndexConfig(model=relative, data=str(data), output=str(tmp_path / "idx"),
                                       concurrency=1, num_cpus=0.5, batch_size=4))
    assert manifest["count"] == 4 and manifest["dim"] == OPEN_CLIP_CFG["embed_dim"]
    assert manifest["model"] == spec
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["model"] == spec
    assert os.path.isabs(manifest["model"].split(":")[1])
