"""The workflow on s3:// for real (SeaweedFS on 127.0.0.1, the session ``s3`` fixture): the
embedded smoke run with its output root on S3 (URL list, download, filter, Ray Train checkpoints,
model, eval, index, report), then a rerun that skips every completed stage."""

from __future__ import annotations

import json

import pytest

from align_ray.workflow.main import main

BUCKET = "e2e"
STAGES = "data,filter,train,eval,index"


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def s3_run(s3, ray_cluster):
    s3.create_bucket(Bucket=BUCKET)
    assert main(["--smoke", "--output", f"s3://{BUCKET}/run", "--stages", STAGES]) == 0
    return s3


def test_every_stage_reads_and_writes_s3(s3_run):
    s3 = s3_run
    keys = set(_keys(s3, "run/"))
    assert {"run/urls.parquet", "run/web.json", "run/data/stats.json", "run/filtered/stats.json",
            "run/filtered/report.json", "run/filtered/rules.png", "run/train/eval.json",
            "run/train/metrics.jsonl", "run/train/curves.png", "run/train/model/config.json",
            "run/train/model/model.safetensors", "run/index/index.json",
            "run/index/image_embeddings.npy", "run/report.html", "run/workflow.json"} <= keys
    assert any(k.startswith("run/data/parquet/") for k in keys)
    assert any(k.startswith("run/filtered/parquet/") for k in keys)
    # Ray Train wrote its checkpoints straight to S3 (storage_path = train output /checkpoints)
    assert any(k.startswith("run/train/checkpoints/align/step_") for k in keys)
    data, filt = _json(s3, "run/data/stats.json"), _json(s3, "run/filtered/stats.json")
    assert data["complete"] and data["input_rows"] == 300
    assert filt["input"] == "s3://e2e/run/data" and 0 < filt["output_rows"] <= data["output_rows"]
    index = _json(s3, "run/index/index.json")
    assert index["count"] == filt["output_rows"] - index["dropped"]
    record = _json(s3, "run/workflow.json")
    assert all(s["status"] == "ran" for s in record["stages"].values())
    assert record["stages"]["eval"]["summary"]["n"] > 0


def test_rerun_skips_completed_stages(s3_run):
    assert main(["--smoke", "--output", f"s3://{BUCKET}/run", "--stages", STAGES]) == 0
    record = _json(s3_run, "run/workflow.json")
    assert {n: s["status"] for n, s in record["stages"].items()} == {
        "data": "skipped", "filter": "skipped", "train": "skipped", "eval": "ran",
        "index": "skipped"}
    assert record["seconds"] < 60
