"""``align-ray train`` argument errors (before Ray starts) and ``align-ray eval`` output (no Ray)."""

from __future__ import annotations

import json

import torch

from align_ray.cli import main
from align_ray.model import DualEncoder, ModelConfig, save_pretrained
from align_ray.model.tokenizer import train_wordpiece


def test_train_rejects_missing_inputs(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.parquet"), "--output",
                 str(tmp_path / "run")]) == 2
    assert "no parquet files" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path / "run")]) == 2


def test_train_names_a_missing_column_or_split_before_ray_starts(small_parquet, tmp_path,
                                                                 capsys):
    """A column the flags name but the data lacks, an image column of strings, or a split value
    no row has, exits 2 saying what is there, checked before Ray (else each Ray Train worker
    failed, KeyError, TypeError or "no full global batch", after the group started, and Ray
    Train retried it three times)."""
    import ray

    base = ["train", "--data", small_parquet, "--output", str(tmp_path / "run"), "--steps", "2",
            "--image-col", "image", "--text-col", "alt_text"]
    missing_col = "no column {} (columns: ['alt_text', "
    for extra, says in ((["--text-col", "txt"], missing_col.format("'txt'")),
                        (["--image-col", "jpg"], missing_col.format("'jpg'")),
                        (["--split-col", "split"], missing_col.format("'split'")),
                        (["--val-fraction", "0.2", "--val-match-col", "concepts"],
                         missing_col.format("'concepts'")),
                        (["--val-data", small_parquet, "--val-match-col", "nope"],
                         missing_col.format("'nope'")),
                        (["--image-col", "alt_text"], "column 'alt_text' holds string, not image"),
                        (["--split-col", "dev_split", "--train-split", "training"],
                         "no row has dev_split == 'training'; its values: 'train' (129 rows), "
                         "'val' (32 rows); set --train-split"),
                        (["--split-col", "dev_split", "--val-split", "test"],
                         "no row has dev_split == 'test'")):
        was_up = ray.is_initialized()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert says in err and "--" in err, err
        assert ray.is_initialized() == was_up           # nothing started for a bad column
    # an image tower timm does not know: before Ray too (else timm failed in every worker)
    y = tmp_path / "model.yaml"
    y.write_text("model: {preset: tiny, image_model: efficientnet_b9}\n")
    assert main(base + ["--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert "model.image_model 'efficientnet_b9' is not a timm model; close names: " \
        "efficientnet_b8" in err, err
    assert ray.is_initialized() == was_up
    # a pretrained tower or tokenizer that cannot be loaded names its setting (it was HF's own
    # message, from every worker, exit 1), and so does a missing image checkpoint file
    (tmp_path / "notamodel").mkdir()
    for model, says in (
            ("text_model: " + str(tmp_path / "nope"), f"model.text_model '{tmp_path / 'nope'}'"
             " cannot be loaded: a directory saved with save_pretrained, or a hub name"),
            ("text_model: " + str(tmp_path / "notamodel"), "model.text_model '"),
            ("tokenizer: " + str(tmp_path / "notamodel"), "model.tokenizer '"),
            ("image_pretrained: " + str(tmp_path / "w.safetensors"),
             f"model.image_pretrained '{tmp_path / 'w.safetensors'}': no such file")):
        y.write_text("model: {preset: tiny, " + model + "}\n")
        assert main(base + ["--config", str(y)]) == 2, model
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert ray.is_initialized() == was_up
    assert not (tmp_path / "run").exists()


def test_eval_prints_one_json(small_parquet, tmp_path, capsys):
    tok = train_wordpiece(["grinning face", "red apple", "a photo of a cat"], 200, 32)
    cfg = ModelConfig.tiny(embed_dim=16, max_length=32)
    torch.manual_seed(0)
    model = DualEncoder(cfg, len(tok))
    save_pretrained(model, tok, model.cfg, str(tmp_path / "m"))
    rc = main(["eval", "--model", str(tmp_path / "m"), "--data", small_parquet,
               "--text-col", "alt_text", "--match-col", "concept", "--classify-col", "label",
               "--split-col", "dev_split", "--split", "val"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 32 and out["skipped_images"] == 0
    for d in ("image_to_text", "text_to_image"):
        assert set(out[d]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
    assert set(out["zero_shot"]) >= {"top1", "top5"} and out["zero_shot"]["classes"] == 32
    # the undecodable training row is skipped and counted, not fatal
    rc = main(["eval", "--model", str(tmp_path / "m"), "--data", small_parquet,
               "--text-col", "alt_text", "--split-col", "dev_split", "--split", "train",
               "--max-rows", "70"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["skipped_images"] == 1


def test_eval_takes_a_config_and_flags_win(small_parquet, tmp_path, capsys):
    tok = train_wordpiece(["grinning face", "red apple"], 200, 32)
    model = DualEncoder(ModelConfig.tiny(embed_dim=16, max_length=32), len(tok))
    save_pretrained(model, tok, model.cfg, str(tmp_path / "m"))
    y = tmp_path / "eval.yaml"
    y.write_text(f"model: {tmp_path / 'm'}\ndata: [{small_parquet}]\ntext_col: alt_text\n"
                 "split_col: dev_split\nsplit: val\nmax_rows: 8\n")
    assert main(["eval", "--config", str(y)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 8
    assert main(["eval", "--config", str(y), "--max-rows", "5"]) == 0     # the flag wins
    assert json.loads(capsys.readouterr().out)["n"] == 5
    y.write_text("max_row: 5\n")
    assert main(["eval", "--config", str(y), "--model", "m", "--data", "d"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["eval", "--data", small_parquet]) == 2                   # no model anywhere
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--data", "d", "--split", "val"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", small_parquet,
                 "--text-col", "alt_text", "--match-col", "concepts"]) == 2   # a missing column
    assert "no column 'concepts'" in capsys.readouterr().err
