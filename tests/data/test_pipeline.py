"""The whole download stage on a real local Ray cluster against the built-in noisy web."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from align_ray.data import pipeline
from align_ray.data.config import DataConfig
from align_ray.web.faults import EXPECTED_OUTCOME
from tests.data.test_fetcher import EXPECTED_REASON, FAST


def row(url: str, caption: str) -> dict:
    return {"url": url, "caption": caption, "noise": "clean", "fault": None}


def run(inp, out, **kw) -> dict:
    return pipeline.run(DataConfig(input=str(inp), output=str(out), **{**FAST, **kw}))


def read_dir(out: Path, sub: str):
    files = sorted((out / sub).glob("*.parquet"))
    return pq.ParquetDataset(files).read() if files else None


def accounting(out: Path, input_keys: list[str]) -> tuple[dict, dict]:
    """key -> output row, key -> dropped row; every input key in exactly one of them, once."""
    samples = read_dir(out, "parquet").to_pylist()
    dropped = read_dir(out, "dropped").to_pylist()
    seen = Counter([r["key"] for r in samples] + [r["key"] for r in dropped])
    assert set(seen) == set(input_keys) and max(seen.values()) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == len(input_keys) == stats["output_rows"] + sum(
        stats["dropped"].values())
    assert stats["output_rows"] == len(samples) and stats["complete"]
    return {r["key"]: r for r in samples}, {r["key"]: r for r in dropped}


def test_noisy_web_with_every_fault(ray_cluster, web, tmp_path):
    rows = web.url_rows(160, noise=True, faults=True, fault_fraction=0.35)
    rows.append({"url": None, "caption": "no url", "noise": "missing", "fault": None})
    rows.append({"url": "gopher://x/y", "caption": "old", "noise": "scheme", "fault": None})
    src = web.write_url_list(tmp_path / "urls.parquet", rows)
    out = tmp_path / "out"
    stats = run(src, out, shard_size=40, extra_cols=["noise", "fault"])
    keys = [f"00000{i:09d}" for i in range(len(rows))]
    samples, dropped = accounting(out, keys)
    for key, row in zip(keys, rows):
        fault = row["fault"]
        if fault and EXPECTED_OUTCOME[fault] == "drop":
            assert dropped[key]["reason"] == EXPECTED_REASON[fault], (fault, dropped.get(key))
        elif fault:
            assert key in samples, (fault, dropped.get(key))
        if key in samples:
            s = samples[key]
            assert s["url"] == row["url"] and s["text"] == row["caption"] and s["noise"] == row["noise"]
            assert (s["width"], s["height"]) == (64, 64) and len(s["sha256"]) == 64
            assert Image.open(io.BytesIO(s["jpg"])).size == (64, 64)
    assert dropped[keys[-2]]["reason"] == "missing_url"
    assert dropped[keys[-1]]["reason"] == "unsupported_scheme"
    redirected = [s for s in samples.values() if s["fault"] == "redirect"]
    assert redirected and all(s["final_url"] != s["url"] for s in redirected)
    noise = Counter(s["noise"] for s in samples.values())
    assert noise["tiny"] and noise["dup_image"]  # noisy-but-valid rows are kept for filtering

    # webdataset shards hold the same samples, readable by the library open_clip uses
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    got = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False).decode("pil")}
    assert set(got) == set(samples)
    k = next(iter(samples))
    assert got[k]["txt"] == samples[k]["text"] and got[k]["jpg"].size == (64, 64)
    assert got[k]["json"]["sha256"] == samples[k]["sha256"]

    # a rerun over a finished output does nothing and changes nothing
    again = run(src, out, shard_size=40, extra_cols=["noise", "fault"])
    assert again["output_rows"] == stats["output_rows"] and again["dropped"] == stats["dropped"]
    assert accounting(out, keys)[0].keys() == samples.keys()


def test_resume_after_kill_gives_the_uninterrupted_key_set(ray_cluster, web, tmp_path):
    rows = [row(f"{web.base_url}/fault/delay_headers/{i}?s=0.25", f"pic {i}") for i in range(120)]
    for i in range(0, 120, 10):  # some rows the uninterrupted run drops
        rows[i]["url"] = f"{web.base_url}/fault/404/{i}"
    src = web.write_url_list(tmp_path / "urls.csv", rows)
    out = tmp_path / "out"
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("timeout_total: 5\nthreads: 2\nshards_per_actor: 1\nprocesses: 2\n"
                   "allow_cidr: ['127.0.0.0/8']\nimage_size: 64\n")
    cmd = [sys.executable, "-m", "align_ray.cli", "data", "--input", str(src), "--output",
           str(out), "--shard-size", "5", "--config", str(cfg),
           "--ray-address", ray_cluster.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / "_shards").glob("*.json"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "run ended before it was killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "_shards").glob("*.json")))
    assert 3 <= done_before < 24, "the kill must land midway"
    stats = run(src, out, shard_size=5, threads=4)
    keys = [f"00000{i:09d}" for i in range(120)]
    samples, dropped = accounting(out, keys)
    assert set(dropped) == {keys[i] for i in range(0, 120, 10)}
    assert all(r["reason"] == "http_404" for r in dropped.values())
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    tar_keys = Counter(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False))
    assert set(tar_keys) == set(samples) and max(tar_keys.values()) == 1
    assert not list(out.rglob("*.tmp-*")), "no half-written files are left behind"
    assert stats["complete"]


def test_retry_failed_recovers_only_retryable_rows(ray_cluster, web, tmp_path):
    rows = ([row(f"{web.base_url}/fault/503once/{5000 + i}", "flaky") for i in range(4)]
            + [row(f"{web.base_url}/fault/404/{i}", "gone") for i in range(3)]
            + [row(f"{web.base_url}/img/{i}.jpg", "fine") for i in range(5)])
    src = web.write_url_list(tmp_path / "urls.jsonl", rows)
    out = tmp_path / "out"
    first = run(src, out, retries=0, shard_size=6)
    assert first["dropped"] == {"http_503": 4, "http_404": 3} and first["output_rows"] == 5
    second = run(src, out, retries=0, shard_size=6, retry_failed=True)
    assert second["dropped"] == {"http_404": 3} and second["output_rows"] == 9
    keys = [f"00000{i:09d}" for i in range(len(rows))]
    samples, dropped = accounting(out, keys)
    assert {samples[k]["text"] for k in keys[:4]} == {"flaky"}
    # shard 0 had retryable rows: its dropped file was replaced; shard 1 had none: untouched
    assert sorted(p.name for p in (out / "dropped").iterdir()) == [
        "00000_00000.r1.parquet", "00000_00001.parquet"]
    # shard 0 had no sample before the retry, so its only samples file is the r1 part
    assert sorted(p.name for p in (out / "parquet").iterdir()) == [
        "00000_00000.r1.parquet", "00000_00001.parquet"]


def test_s3_input_and_output(ray_cluster, web, s3, tmp_path):
    s3.create_bucket(Bucket="crawl")
    rows = web.url_rows(30, noise=False)
    local = web.write_url_list(tmp_path / "urls.tsv", rows)
    s3.put_object(Bucket="crawl", Key="lists/part-0.tsv", Body=local.read_bytes())
    stats = pipeline.run(DataConfig(input="s3://crawl/lists/", output="s3://crawl/out",
                                    **{**FAST, "shard_size": 16}))
    assert stats["output_rows"] == 30 and stats["complete"]
    body = s3.get_object(Bucket="crawl", Key="out/stats.json")["Body"].read()
    assert json.loads(body)["input_rows"] == 30
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://")[1],
                           scheme="http")
    table = pq.ParquetDataset("crawl/out/parquet", filesystem=fs).read()
    assert sorted(table.column("url").to_pylist()) == sorted(r["url"] for r in rows)
    listed = s3.list_objects_v2(Bucket="crawl", Prefix="out/webdataset/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "out/webdataset/00000_00000.tar", "out/webdataset/00000_00001.tar"]


def test_bad_file_inside_a_folder_names_the_file(ray_cluster, tmp_path):
    from align_ray.data.errors import InputError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("url,caption\nhttp://127.0.0.1:9/x.jpg,fine\n")
    (tmp_path / "in" / "b.csv").write_bytes(b"url,caption\nhttp://127.0.0.1:9/y.jpg,caf\xe9\n")
    with pytest.raises(InputError, match=r"b\.csv: not valid UTF-8"):
        run(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "stats.json").exists()


def test_work_items_keep_a_host_group_in_one_item():
    plan = {"host_groups": 2, "files": [
        {"shards": 3, "host_groups": [0, 0, 1]}, {"shards": 2, "host_groups": [0, 1]}]}
    markers = {"00000_00000": {"retryable_dropped": 2}, "00001_00001": {"retryable_dropped": 0}}
    items = [json.loads(i["specs"]) for i in pipeline.work_items(plan, markers, True)]
    assert items == [[["00000_00001", 0, 1, False], ["00001_00000", 1, 0, False],
                      ["00000_00000", 0, 0, True]],
                     [["00000_00002", 0, 2, False]]]
    plain = {"files": [{"shards": 2}]}
    assert [json.loads(i["specs"]) for i in pipeline.work_items(plain, {}, False)] == [
        [["00000_00000", 0, 0, False]], [["00000_00001", 0, 1, False]]]
