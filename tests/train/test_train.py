"""Ray Train end to end (real local Ray, 2 gloo workers, tiny model, 64 px, batch 4/worker):
a run + a resume with more steps, and a range-test run where one worker fails once mid-run
(the replayed steps get the very batches the failed attempt had)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from align_ray.model import Embedder, ModelConfig
from align_ray.train import checkpoint as ckpt_lib
from align_ray.train.config import TrainConfig
from align_ray.train.optim import lr_factor
from align_ray.train.run import run


def _cfg(data: str, out: Path, **kw) -> TrainConfig:
    base = dict(data=[data], image_col="image", text_col="alt_text", output=str(out), workers=2,
                batch_size=4, checkpoint_every=2, keep_checkpoints=2, log_every=1,
                warmup_steps=1, data_workers=1, shuffle_buffer=16, seed=0,
                model=ModelConfig.tiny(embed_dim=32, vocab_size=1000, max_length=32))
    base.update(kw)
    return TrainConfig(**base)


def _latest(out: Path) -> Path:
    snap = json.loads((out / "checkpoints/align/checkpoint_manager_snapshot.json").read_text())
    dirs = sorted((out / "checkpoints/align").glob("step_*"),
                  key=lambda p: ckpt_lib.read_state(p).step)
    assert snap and dirs
    return dirs[-1]


def _steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)]


def test_run_writes_outputs_and_resumes(ray_cluster, small_parquet, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(small_parquet, out, steps=4, split_col="dev_split", val_match_col="concept")
    s = run(cfg)
    assert (s["step"], s["samples_seen"], s["restarts"]) == (4, 4 * 8, 0)
    assert s["bad_images_skipped"] == 1  # counted and skipped, never fatal
    for f in ("model/config.json", "model/model.safetensors", "metrics.jsonl", "curves.png",
              "eval.json"):
        assert (out / f).stat().st_size > 0, f
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the mixing metric of every logged step (one input file: every pair shares it)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mix/same_file_pairs"] == r["mix/same_file_pairs_uniform"] == 1.0
               for r in logged if "loss" in r)
    # the worker's clock in every record (where a run's time goes), rising; no GPU keys on CPU
    clock = [r["elapsed_s"] for r in logged]
    assert clock == sorted(clock) and clock[0] > 0
    assert [r["val_s"] > 0 for r in logged if "val/n" in r] == [True]
    assert not any("gpu_mem_peak_gib" in r for r in logged)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 32 and set(ev["image_to_text"]) == {"R@1", "R@5", "R@10", "mean_rank",
                                                          "median_rank"}
    assert _steps(out) == [1, 2, 3, 4]
    emb = Embedder.load(out / "model")
    assert emb.embed_texts(["grinning face"]).shape == (1, 32)

    # same output + name -> resumes from the step-4 checkpoint and runs on to 6
    s2 = run(_cfg(small_parquet, out, steps=6, split_col="dev_split"))
    assert (s2["step"], s2["samples_seen"], s2["resumed_from_step"]) == (6, 6 * 8, 4)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert len(list((out / "checkpoints/align").glob("step_*"))) == 2  # keep_checkpoints
    pos = np.load(_latest(out) / "data_position.npy")  # [epoch, offset] per rank, no id list
    assert pos.tolist() == s2["data_position"] and pos.shape == (2, 2)
    # 6 x 4 rows kept per rank, + the val rows / the bad image its stream skipped; epoch 0
    assert (pos[:, 0] == 0).all() and (pos[:, 1] >= 6 * 4).all()


def _record_batches(folder: Path):
    def hook(step: int, rank: int, batches: list) -> None:  # runs on the workers
        import os

        import numpy as _np

        ids = _np.concatenate([b["row_id"].numpy() for b in batches])
        pix = hashlib.sha1(b"".join(b["pixels"].numpy().tobytes() for b in batches)).hexdigest()
        _np.savez(folder / f"s{step}-r{rank}-p{os.getpid()}.npz", ids=ids, pixels=pix)

    return hook


def test_worker_failure_resumes_from_last_checkpoint_on_s3(ray_cluster, small_parquet, tmp_path,
                                                           s3):
    """Rank 1 raises after step 3 once.  The whole run directory is an s3:// URI on a real S3
    server (no local path is written): checkpoints (every 2 steps), rank 0's metrics.jsonl and
    TensorBoard events, the driver's model/, curves.png and eval.json.

    The run is also a learning-rate range test (``schedule: range_test``, lr 1e-4 -> 1 over the
    6 steps): its lr_find.json/png go to S3 with the rest, and the logged learning rates are one
    geometric curve across the restart (the scheduler resumes where the checkpoint left it).
    It also draws its batches ``resampled`` (each step's global batch a fresh draw of the rows,
    ``shuffle_buffer`` holding the data): the replay holds for draws too, and each step is one
    draw.  One run covers all three because a Ray Train run costs CI tens of seconds of
    start-up alone (epoch order through a resume: test_run_writes_outputs_and_resumes)."""
    marker = tmp_path / "failed-once"

    def fail_once(step: int, rank: int) -> None:  # runs on the workers (pickled by value)
        if step == 3 and rank == 1 and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("injected failure at step 3")

    s3.create_bucket(Bucket="train-ckpt")
    seen = tmp_path / "batches"
    seen.mkdir()
    cfg = _cfg(small_parquet, "s3://train-ckpt/runs", steps=6, max_failures=1,
               schedule="range_test", lr=1.0, min_lr_ratio=1e-4, resampled=True,
               shuffle_buffer=128)
    s = run(cfg, step_hook=fail_once, data_hook=_record_batches(seen))
    assert marker.exists()
    assert (s["step"], s["samples_seen"], s["restarts"], s["resumed_from_step"]) == (6, 48, 1, 2)
    metrics = s3.get_object(Bucket="train-ckpt", Key="runs/metrics.jsonl")["Body"].read().decode()
    logged = [json.loads(x) for x in metrics.splitlines() if "loss" in json.loads(x)]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]  # steps 3.. replayed once, logged once
    want = [lr_factor(i, total=6, warmup=1, schedule="range_test", min_ratio=1e-4)
            for i in range(6)]
    assert want[0] == pytest.approx(1e-4) and want[-1] == pytest.approx(1.0)
    assert [r["lr"] for r in logged] == pytest.approx(want, rel=1e-6)
    found = json.loads(s3.get_object(Bucket="train-ckpt", Key="runs/lr_find.json")["Body"].read())
    assert found["steps"] == 6 and 1e-4 <= found["suggested_lr"] <= 1.0
    assert s["lr_find"]["suggested_lr"] == found["suggested_lr"]
    # the replayed steps got the failed attempt's batches: same rows, same order, same pixels
    got: dict = {}
    for f in seen.glob("*.npz"):
        step, rank, _ = f.stem.split("-")
        z = np.load(f)
        got.setdefault((step, rank), []).append((z["ids"].tolist(), str(z["pixels"])))
    replayed = {k: v for k, v in got.items() if len(v) > 1}
    assert ("s3", "r1") in replayed  # rank 1 ran step 3, failed, and ran it again
    assert all(v[0] == w for v in replayed.values() for w in v[1:])
    for st in range(1, 7):  # a step's global batch: one draw, 8 distinct rows
        ids = [i for r in ("r0", "r1") for i in got[(f"s{st}", r)][0][0]]
        assert len(set(ids)) == 8, st
    # one draw (a resampled "epoch") per step: step 6 took draw 5 on both ranks
    assert s["epoch"] == 5 and [p[0] for p in s["data_position"]] == [5, 5]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="train-ckpt")["Contents"]]
    assert any(k.startswith("runs/checkpoints/align/step_00000006") for k in keys)
    assert any(k.startswith("runs/checkpoints/align/tokenizer/") for k in keys)
    assert s["checkpoint"].startswith("train-ckpt/runs/checkpoints/align/step_00000006")
    assert {"runs/model/config.json", "runs/model/model.safetensors", "runs/curves.png",
            "runs/eval.json", "runs/lr_find.png"} <= set(keys)
    assert any(k.startswith("runs/tb/events.") for k in keys)  # uploaded by rank 0 as it ran
    assert s["model_dir"] == "s3://train-ckpt/runs/model" and s["output"] == "s3://train-ckpt/runs"
    assert Embedder.load(s["model_dir"]).embed_texts(["grinning face"]).shape == (1, 32)
    assert not Path("s3:").exists() and not (Path.cwd() / "s3:").exists()
