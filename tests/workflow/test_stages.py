"""The workflow's skip rule for a finished training run (a rerun skips it): eval.json plus a
saved model in any format ``train`` writes, our own, an HF fine-tune's or an open_clip one's."""

from __future__ import annotations

import json

import pytest

from align_ray.workflow.stages import _train_done


@pytest.mark.parametrize("saved", ["config.json", "open_clip_config.json"])
def test_a_run_with_eval_and_a_saved_model_is_done(tmp_path, saved):
    (tmp_path / "model").mkdir()
    (tmp_path / "eval.json").write_text(json.dumps({"n": 3}))
    assert _train_done(str(tmp_path)) is None          # eval alone: the model is not saved yet
    (tmp_path / "model" / saved).write_text("{}")
    assert _train_done(str(tmp_path)) == {"n": 3}


def test_a_saved_model_without_eval_is_not_done(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert _train_done(str(tmp_path)) is None
