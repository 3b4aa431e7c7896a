#!/usr/bin/env python
"""Tail averaging (SWA-style, Izmailov et al. 2018): do the mean weights of a run's last few
checkpoints retrieve other artists' unseen concepts better than its final weights?

Takes an ``align-ray train`` output folder whose run kept several checkpoints
(``checkpoint_every: 25``, ``keep_checkpoints: 13``), and for each ``--tails`` value K writes a
copy of the final model whose weights are the mean of the last K checkpoints' (every float
tensor, BatchNorm statistics included; integer buffers from the final one). K = 1 is the model
as trained. Each copy is scored as ``wise_ft.py`` scores its rows (``align-ray eval``'s
``evaluate``: dev val split, other renderings' val and train concepts). No training: every row
has the run's training compute.

    .venv/bin/python benchmarks/checkpoint_average.py --run /tmp/qvp-tail/ar-seed0 \\
        --renderings $R --tails 1 2 3 4 5 --json benchmarks/results/checkpoint-average-....json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _bench_common import machine, write_json
from wise_ft import scores


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every kept checkpoint, oldest first."""
    found = []
    for state in run.glob("checkpoints/**/state.json"):
        found.append((json.loads(state.read_text())["step"], state.parent))
    return sorted(found)


def average(run: Path, k: int, out: Path) -> list[int]:
    """A copy of ``run/model`` holding the mean of the last ``k`` checkpoints' weights."""
    final = load_file(str(run / "model" / "model.safetensors"))
    picked = checkpoints(run)[-k:]
    states = [torch.load(d / "model.pt", map_location="cpu", weights_only=True) for _, d in picked]
    mixed = {}
    for name, v in final.items():
        if not v.is_floating_point():
            mixed[name] = v
            continue
        parts = [s[name] for s in states]
        assert all(p.shape == v.shape for p in parts), name
        mixed[name] = (sum(p.double() for p in parts) / len(parts)).to(v.dtype)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run / "model", out)
    save_file({n: t.contiguous() for n, t in mixed.items()}, str(out / "model.safetensors"))
    return [s for s, _ in picked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="an align-ray train --output folder")
    ap.add_argument("--renderings", nargs="*", default=[])
    ap.add_argument("--tails", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    run = Path(args.run)
    last_step, last_dir = checkpoints(run)[-1]
    # the final checkpoint is the model as exported: the check that names match and K=1 is it
    final = load_file(str(run / "model" / "model.safetensors"))
    state = torch.load(last_dir / "model.pt", map_location="cpu", weights_only=True)
    assert set(final) <= set(state), sorted(set(final) - set(state))[:5]
    assert all(torch.equal(final[n], state[n]) for n in final), "final checkpoint != model"
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="ckpt-avg-"))
    for k in args.tails:
        model = tmp / f"tail{k}"
        steps = average(run, k, model)
        row = {"tail": k, "steps": steps, **scores(model, args.renderings)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.json, {"run": str(run), "last_step": last_step, "machine": machine(),
                           "metric": "R@10 / chance (i->t, t->i)", "rows": rows})


if __name__ == "__main__":
    main()
