"""``align-ray score`` as users run it: a subprocess on a ``ray start --num-cpus=2`` head, on
plain parquet (the corpus file, cut into row-group shards), then ``align-ray filter`` with the
score rule on the scored data-stage dir; and a bad ``--model`` exits 2 before any work."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from align_ray.filter.config import RULES, SCORE_RULES
from tests import test_cli_stages as stages

# the 2-CPU `ray start` head, its CLI runner and its skip rule (needs the shared dev set)
ray2, cli, pytestmark = stages.ray2, stages.cli, stages.pytestmark


def test_score_then_filter_through_the_cli(ray2, tiny_model, corpus, stage_in, tmp_path):
    out = tmp_path / "scored"
    proc = cli("score", "--model", tiny_model, "--input", corpus["path"], "--output", str(out),
               "--shard-rows", "16", "--batch-size", "16", address=ray2, timeout=240,
               cwd=tmp_path)
    n = len(corpus["rows"])
    assert f"{n - 1}/{n} rows scored" in proc.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"] == 3 and stats["dropped"] == {"decode_error": 1}
    assert {"image", "text", "url", "pair_score"} <= set(pq.read_schema(
        next((out / "parquet").glob("*.parquet"))).names)

    # a data-stage dir has what the filter reads; scored cross-fitted (README "Stage 2b"), with
    # the same model for both folds, so every row's score is the model's own
    scored = tmp_path / "scored_stage"
    cli("score", "--fold-models", tiny_model, "--fold-models", tiny_model, "--input",
        str(stage_in), "--output", str(scored), address=ray2, timeout=240, cwd=tmp_path)
    assert json.loads((scored / "stats.json").read_text())["model"] == [tiny_model] * 2
    flags = [a for r in RULES if r not in SCORE_RULES for a in ("--disabled-rules", r)]
    cli("filter", "--input", str(scored), "--output", str(tmp_path / "f"),
        "--score-keep-fraction", "0.5", *flags, "--no-report", address=ray2, timeout=240,
        cwd=tmp_path)
    kept = pa.concat_tables([pq.read_table(f) for f in (tmp_path / "f" / "parquet").glob("*")])
    assert kept.num_rows == math.ceil(0.5 * (n - 1))
    every = pa.concat_tables([pq.read_table(f) for f in (scored / "parquet").glob("*")])
    best = sorted(zip(every.column("pair_score").to_pylist(), every.column("key").to_pylist()),
                  key=lambda sk: (-sk[0], sk[1]))[:kept.num_rows]
    assert set(kept.column("key").to_pylist()) == {k for _, k in best}
    assert "image_embedding" in kept.column_names   # the scores travel on with the rows


def test_bad_model_spec_exits_2(corpus, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "align_ray.cli", "score", "--model",
                           str(tmp_path / "no-such-model"), "--input", corpus["path"],
                           "--output", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "align-ray score: error" in proc.stderr
    # cross-fitting: every fold model is checked, and no model at all is named as missing
    for models, says in (([str(tmp_path / "no-such-model")] * 2, "no-such-model"),
                         ([], "--model (or --fold-models, two or more) required")):
        proc = subprocess.run([sys.executable, "-m", "align_ray.cli", "score",
                               *(a for m in models for a in ("--fold-models", m)), "--input",
                               corpus["path"], "--output", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "stats.json").exists()
