"""The whole filter stage on a real local Ray cluster: a crafted corpus with hand-computed
answers for every rule, then the noisy web end to end through ``align-ray data --filter``, and
scored, through every newer rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.filter import pipeline
from align_ray.filter.config import RULES, FilterConfig
from align_ray.filter.evalset import image_phash
from tests.data.test_fetcher import FAST
from tests.data.test_resizer import encode, picture
from tests.filter import crafted
from tests.score.conftest import corpus, tiny_model  # noqa: F401  (fixtures)


def read_dir(out: Path, sub: str, pattern: str = "*.parquet") -> pa.Table:
    files = sorted((out / sub).glob(pattern))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


@pytest.fixture(scope="module")
def crafted_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crafted")
    eval_png = encode(picture(500, 400, seed=1), "PNG")
    pq.write_table(pa.table({"image": [eval_png]}), tmp / "eval.parquet")
    corpus = crafted.build(image_phash(eval_png))
    stats1 = crafted.write_stage1(corpus, tmp / "stage1")
    os.environ["ALIGN_RAY_BLOCKLIST"] = "nsfw"
    cfg = FilterConfig(input=str(tmp / "stage1"), output=str(tmp / "out"),
                       eval_sets=[str(tmp / "eval.parquet")],
                       safety_hook="align_ray.filter.safety:keyword_hook")
    return corpus, stats1, cfg, pipeline.run(cfg)


def test_every_rule_gives_the_hand_computed_survivors(crafted_run):
    corpus, stats1, cfg, stats = crafted_run
    out = Path(cfg.output)
    kept = read_dir(out, "parquet")
    assert sorted(kept.column("key").to_pylist()) == sorted(
        k for k, r in corpus.expected.items() if r is None)
    dropped = read_dir(out, "dropped", "0*.parquet")
    got = dict(zip(dropped.column("key").to_pylist(), dropped.column("reason").to_pylist()))
    assert got == {k: r for k, r in corpus.expected.items() if r is not None}
    assert stats["stages"]["filter"]["dropped"] == crafted.expected_counts(corpus)
    assert all(dropped.column("detail").to_pylist())          # every drop says why
    assert kept.column("jpg").null_count == 0 and "jpg" not in dropped.column_names


def test_accounting_holds_across_both_stages(crafted_run):
    corpus, stats1, cfg, stats = crafted_run
    out = Path(cfg.output)
    assert stats["input_rows"] == stats1["input_rows"]
    assert stats["input_rows"] == stats["output_rows"] + sum(stats["dropped"].values())
    assert stats["dropped"]["http_404"] == stats1["dropped"]["http_404"]
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["output_rows"] == stats["output_rows"] and on_disk["complete"]
    carried = read_dir(out, "dropped", "download-*.parquet")
    filtered = read_dir(out, "dropped", "0*.parquet")
    assert carried.num_rows + filtered.num_rows + read_dir(out, "parquet").num_rows == \
        stats["input_rows"]
    n_tar = 0
    for tar in (out / "webdataset").glob("*.tar"):
        with tarfile.open(tar) as t:
            n_tar += sum(1 for m in t.getmembers() if m.name.endswith(".jpg"))
    assert n_tar == stats["output_rows"]


def test_report_names_the_skewed_text_and_writes_plots(crafted_run):
    corpus, _, cfg, stats = crafted_run
    out = Path(cfg.output)
    rep = json.loads((out / "report.json").read_text())
    assert rep["top_dropped_texts"][0] == {"text": crafted.S1, "dropped_rows": 3000}
    assert rep["top_dropped_texts"][1] == {"text": crafted.S2, "dropped_rows": 1500}
    assert rep["top_images"][0]["rows"] == 1001 and rep["top_images"][0]["distinct_texts"] == 1001
    assert sum(rep["hist_before"]["tokens"]) == len(corpus.rows)
    assert sum(rep["hist_after"]["tokens"]) == stats["output_rows"]
    for png in ("rules.png", "tokens.png", "image_size.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "text_too_many_images" in stats["report"]
    assert rep["vocab"]["cut"] == 2


def test_rerun_of_a_complete_output_is_a_no_op(crafted_run):
    _, _, cfg, stats = crafted_run
    again = pipeline.run(cfg)
    assert again["seconds"] == stats["seconds"]


def test_incomplete_download_stage_is_refused(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "stats.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(Exception, match="not complete"):
        pipeline.run(FilterConfig(input=str(tmp_path / "s1"), output=str(tmp_path / "o")))
    with pytest.raises(Exception, match="no stats.json"):
        pipeline.run(FilterConfig(input=str(tmp_path / "nope"), output=str(tmp_path / "o")))


def test_a_scored_plain_parquet_is_refused_naming_the_missing_columns(tmp_path, capsys):
    """`align-ray score` of a plain parquet carries only that parquet's columns: the filter must
    say what is missing, exit 2 and touch nothing (it failed in a Ray task with a KeyError)."""
    from align_ray import cli

    src = tmp_path / "scored"
    for sub in ("parquet", "_shards"):
        (src / sub).mkdir(parents=True)
    pq.write_table(pa.table({"image": [b"png"] * 3, "alt_text": ["a b c"] * 3,
                             "pair_score": pa.array([0.1, 0.2, 0.3], pa.float32())}),
                   src / "parquet" / "00000.parquet")
    (src / "_shards" / "00000.json").write_text(json.dumps(
        {"shard": "00000", "input_rows": 3, "output_rows": 3, "dropped": {},
         "parts": ["parquet/00000.parquet"]}))
    (src / "stats.json").write_text(json.dumps({"input_rows": 3, "output_rows": 3,
                                                "complete": True}))
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = FilterConfig(input=str(src), output=str(out), semdedup=True)
    with pytest.raises(Exception, match="no key, text, sha256, phash, text_hash, original_width, "
                                        "original_height column.*`align-ray data`"):
        pipeline.run(cfg)
    assert cli._run_filter_stage(cfg) == 2
    assert "not a plain parquet" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.fixture(scope="module")
def noisy_web(ray_cluster, web, tmp_path_factory) -> tuple[Path, Path, dict]:
    """`align-ray data --filter` on the built-in noisy web (300 rows, 10 % faults): the data
    stage's dir, the filter's dir, and the process's output."""
    tmp_path = tmp_path_factory.mktemp("noisy-web")
    rows = web.url_rows(300, noise=True, faults=True, fault_fraction=0.1)
    src = web.write_url_list(tmp_path / "urls.parquet", rows)
    out = tmp_path / "web"
    flags = ["--allow-cidr", "127.0.0.0/8", "--image-size", "64", "--shard-size", "100",
             "--url-col", "url", "--text-col", "caption"]
    fast = tmp_path / "fast.yaml"
    fast.write_text("".join(f"{k}: {v}\n" for k, v in FAST.items()
                            if k not in ("allow_cidr", "image_size")))
    fcfg = tmp_path / "filter.yaml"
    fcfg.write_text("min_side: 40\n")      # the noisy web's pictures are small
    proc = subprocess.run(
        [sys.executable, "-m", "align_ray.cli", "data", "--input", str(src), "--output", str(out),
         "--config", str(fast), *flags, "--filter", "--filter-config", str(fcfg),
         "--ray-address", ray_cluster.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, Path(f"{out}_filtered"), {"stdout": proc.stdout}


def test_noisy_web_end_to_end_through_the_cli(noisy_web):
    """`align-ray data --filter` on the built-in noisy web: every input row accounted for."""
    _, fout, proc = noisy_web
    assert "align-ray filter:" in proc["stdout"]
    stats = json.loads((fout / "stats.json").read_text())
    assert stats["input_rows"] == 300 == stats["output_rows"] + sum(stats["dropped"].values())
    keys = set(read_dir(fout, "parquet").column("key").to_pylist())
    dropped = read_dir(fout, "dropped")
    assert keys.isdisjoint(dropped.column("key").to_pylist())
    assert len(keys) + dropped.num_rows == 300
    reasons = Counter(dropped.column("reason").to_pylist())
    assert reasons == Counter(stats["dropped"])
    filtered = stats["stages"]["filter"]
    assert set(filtered["dropped"]) <= set(RULES) and sum(filtered["dropped"].values()) > 0
    assert filtered["input_rows"] == stats["stages"]["data"]["output_rows"]
    assert 0 < stats["output_rows"] < filtered["input_rows"]


def test_the_new_rules_on_the_scored_noisy_web(noisy_web, tiny_model, tmp_path):
    """`align-ray score` on the noisy web's downloaded rows, then the filter with the newer
    rules on beside ALIGN's: the global score cut, SemDeDup, pHash near-duplicates over the
    whole corpus and MetaCLIP balancing.  Each rule that drops is counted in stats.json with
    the rows in dropped/ under its name, and every row is accounted for."""
    from align_ray.score import pipeline as score_pipeline
    from align_ray.score.config import ScoreConfig

    data, _, _ = noisy_web
    scored = tmp_path / "scored"
    score_pipeline.run(ScoreConfig(model=tiny_model, input=str(data), output=str(scored),
                                   batch_size=32, concurrency=1, num_cpus=1))
    n = json.loads((scored / "stats.json").read_text())["output_rows"]
    words = Counter(w for t in read_dir(scored, "parquet").column("text").to_pylist()
                    for w in t.lower().split() if len(w) > 3)
    entries = tmp_path / "entries.txt"
    entries.write_text("".join(f"{w}\n" for w, _ in words.most_common(30)))
    cfg = FilterConfig(input=str(scored), output=str(tmp_path / "out"), min_side=40,
                       score_keep_fraction=0.8, semdedup=True, semdedup_clusters=4,
                       semdedup_eps=0.2, near_dup_distance=6, balance_entries=str(entries),
                       balance_cap=5, num_partitions=2, write_webdataset=False)
    stats = pipeline.run(cfg)
    recorded = json.loads((tmp_path / "out" / "stats.json").read_text())
    print("noisy web, every rule:", n, "scored rows ->", recorded["stages"]["filter"]["dropped"])
    assert recorded["input_rows"] == n == recorded["output_rows"] + sum(recorded["dropped"].values())
    dropped = read_dir(tmp_path / "out", "dropped")
    assert Counter(dropped.column("reason").to_pylist()) == Counter(recorded["dropped"])
    assert recorded["dropped"] == stats["dropped"]
    new = ("score_keep_fraction", "semantic_duplicate", "near_duplicate", "metaclip_balance")
    assert all(recorded["stages"]["filter"]["dropped"].get(r, 0) > 0 for r in new), recorded
