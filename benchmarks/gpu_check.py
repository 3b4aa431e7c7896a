"""GPU check: the CLI stages as a user runs them, on one NVIDIA GPU (CI has none).

Each step is a whole ``align-ray`` command run as a subprocess that starts its own local Ray,
as on a single GPU box:

1. ``train --use-gpu`` (bf16 autocast) at the training-quality issue's budget: the dev set, the
   default (tiny) model, global batch 128, 300 steps; val retrieval on unseen concepts;
2. ``eval`` of that model;
3. ``index --num-gpus 1`` and the same index on CPU: every row's GPU embedding against its CPU
   one (cosine), both towers;
4. throughput of the ALIGN-sized preset (``model: {preset: align}``: efficientnet_b0 at 224 px +
   a BERT-base-sized text tower): batch B in one step, and the same global batch as
   ``--accum-steps K`` micro-batches of B/K (GradCache): samples/s and peak GPU memory from the
   loop's own ``metrics.jsonl``.

A failed step is recorded (rc, stderr tail) and the next one still runs.  Results:
``OUT/gpu_check.json``.

    python benchmarks/gpu_check.py --data ../shared/data/emoji_noto_dev.parquet --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], log: Path, timeout: float) -> dict:
    """One ``align-ray`` command; whole-process wall time, rc, the last stdout line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            p = subprocess.run([sys.executable, "-m", "align_ray.cli", *args], stdout=subprocess.PIPE,
                               stderr=f, text=True, env=env, timeout=timeout)
            rc, out = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:  # its stdout may be bytes even with text=True
            rc = 124
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.perf_counter() - t0
    res = {"cmd": "align-ray " + " ".join(args), "rc": rc, "wall_s": round(wall, 1)}
    lines = [x for x in out.splitlines() if x.strip()]
    res["last_stdout"] = lines[-1][-2000:] if lines else ""
    if rc != 0:
        res["stderr_tail"] = log.read_text()[-3000:]
    print(json.dumps({k: v for k, v in res.items() if k != "last_stdout"}), flush=True)
    return res


def metrics(run: Path, skip: int) -> dict:
    """The loop's own figures past the first ``skip`` steps (warm-up, cudnn autotune)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if "loss" in r and "val/n" not in r]
    late = [r for r in train if r["step"] > skip] or train[-1:]
    step_s = float(np.median([r["step_time_s"] for r in late]))
    out = {"steps_logged": len(train), "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"],
           "loss_curve": [[r["step"], round(r["loss"], 3)] for r in train],
           "median_step_s": step_s, "samples_per_s": float(np.median([r["samples_per_s"] for r in late])),
           "data_wait_s": float(np.median([r["data_wait_s"] for r in late])),
           "gpu_mem_peak_gib": max((r.get("gpu_mem_peak_gib", 0.0) for r in train), default=None),
           "gpu_mem_reserved_gib": max((r.get("gpu_mem_reserved_gib", 0.0) for r in train),
                                       default=None)}
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    if "chance" in ev:  # a run with a validation split
        out["val"] = {k: ev.get(k) for k in ("n", "image_to_text", "text_to_image", "chance")}
        out["val_R@10_x_chance"] = {d: ev[d]["R@10"] / ev["chance"]["R@10"]
                                    for d in ("image_to_text", "text_to_image")}
    return out


def compare_index(a: Path, b: Path) -> dict:
    out = {}
    for name in ("image_embeddings.npy", "text_embeddings.npy"):
        x, y = np.load(a / name).astype(np.float64), np.load(b / name).astype(np.float64)
        if x.shape != y.shape:
            out[name] = {"shape_mismatch": [list(x.shape), list(y.shape)]}
            continue
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        out[name] = {"rows": int(x.shape[0]), "min_cos": float(cos.min()),
                     "median_cos": float(np.median(cos))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/emoji_noto_dev.parquet"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gpu-check")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--align-batch", type=int, default=256)
    ap.add_argument("--align-accum", type=int, default=4)
    ap.add_argument("--align-steps", type=int, default=30)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--only", default="train,eval,index,align")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no --use-gpu/--num-gpus: tries this script on a machine without GPUs")
    a = ap.parse_args()
    gpu = [] if a.cpu_dry_run else ["--use-gpu"]
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    res: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                 "cpus": os.cpu_count(), "steps": {}}
    save = lambda: (out / "gpu_check.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    only = set(a.only.split(","))
    D = ["--data", a.data]
    run_dev = work / "run_dev"
    if "train" in only:
        r = cli(["train", *D, "--image-col", "image", "--text-col", "alt_text", "--split-col",
                 "dev_split", "--output", str(run_dev), "--workers", "1", *gpu,
                 "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--log-every", "10"],
                out / "train_dev.log", a.timeout)
        if r["rc"] == 0:
            r.update(metrics(run_dev, skip=20))
            shutil.copy(run_dev / "metrics.jsonl", out / "train_dev.metrics.jsonl")
        res["steps"]["train_dev"] = r
        save()
    if "eval" in only:
        r = cli(["eval", "--model", str(run_dev / "model"), *D, "--text-col", "alt_text",
                 "--match-col", "concept", "--classify-col", "label", "--split-col", "dev_split",
                 "--split", "val"], out / "eval.log", a.timeout)
        if r["rc"] == 0:
            r["result"] = json.loads(r.pop("last_stdout"))
        res["steps"]["eval"] = r
        save()
    if "index" in only:
        for dev, extra in (("gpu", ["--num-gpus", "1"] if gpu else []), ("cpu", [])):
            r = cli(["index", "--model", str(run_dev / "model"), *D, "--image-col", "image",
                     "--text-col", "text", "--output", str(work / f"index_{dev}"), *extra],
                    out / f"index_{dev}.log", a.timeout)
            res["steps"][f"index_{dev}"] = r
            save()
        if all(res["steps"][f"index_{d}"]["rc"] == 0 for d in ("gpu", "cpu")):
            res["steps"]["index_gpu_vs_cpu"] = compare_index(work / "index_gpu", work / "index_cpu")
            print(json.dumps(res["steps"]["index_gpu_vs_cpu"]), flush=True)
            save()
    if "align" in only:
        yaml = work / "align.yaml"
        yaml.write_text("model: {preset: align}\n")
        for name, bs, k in (("align_b%d" % a.align_batch, a.align_batch, 1),
                            ("align_b%dx%d" % (a.align_batch // a.align_accum, a.align_accum),
                             a.align_batch // a.align_accum, a.align_accum)):
            run = work / name
            r = cli(["train", "--config", str(yaml), *D, "--image-col", "image", "--text-col",
                     "alt_text", "--output", str(run), "--workers", "1", *gpu,
                     "--batch-size", str(bs), "--accum-steps", str(k),
                     "--steps", str(a.align_steps), "--log-every", "2",
                     "--checkpoint-every", str(a.align_steps)], out / f"{name}.log", a.timeout)
            if r["rc"] == 0:
                r.update(metrics(run, skip=a.align_steps // 3))
            res["steps"][name] = r
            save()
    print(json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
