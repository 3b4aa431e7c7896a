"""WiSE-FT (Wortsman et al. 2022) on a fine-tuned image tower: does interpolating its weights
back towards the pretrained ones help on styles the fine-tuning never saw?

Takes a model that ``align-ray train`` fine-tuned from a pretrained image tower
(``model.image_pretrained``), and for each alpha writes a copy whose image tower is
``alpha * fine-tuned + (1 - alpha) * pretrained`` (every float tensor, BatchNorm statistics
too; the projections and the temperature stay fine-tuned, since the pretrained side has no
projection to go back to). ``--text-alphas`` does the same to the text tower, towards its
``model.text_model`` (its unlocked layers are the only ones that moved). Each copy is scored by ``align-ray eval``'s own
``evaluate`` on the dev set's val split and on other artists' renderings
(``other_renderings.py``), val and train concepts, as ``quality_vs_plain.py`` scores its runs.
No training: alpha = 1 is the model as trained, so every row costs the same training compute.

    .venv/bin/python benchmarks/wise_ft.py --model /tmp/qvp-wise/ar-seed0/model \\
        --renderings $R --alphas 1 0.8 0.6 0.5 --json benchmarks/results/wise-ft-....json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from _bench_common import DEV_SET, machine, write_json

PREFIX, TEXT_PREFIX = "image_tower.", "text_tower."


def _pretrained_text(meta: dict) -> dict:
    files = sorted(Path(meta["model_config"]["text_model"]).glob("*.safetensors"))
    return load_file(str(files[0])) if files else {}


def interpolate(model_dir: Path, alpha: float, out: Path, text_alpha: float = 1.0) -> dict:
    """A copy of ``model_dir`` whose image tower (and, with ``text_alpha`` < 1, text tower) is
    mixed with its pretrained weights."""
    meta = json.loads((model_dir / "config.json").read_text())
    pre = {PREFIX: load_file(meta["model_config"]["image_pretrained"])}
    if text_alpha != 1.0:
        pre[TEXT_PREFIX] = _pretrained_text(meta)
    tuned = load_file(str(model_dir / "model.safetensors"))
    mixed, n = {}, {PREFIX: 0, TEXT_PREFIX: 0}
    for k, v in tuned.items():
        mixed[k] = v
        for prefix, a in ((PREFIX, alpha), (TEXT_PREFIX, text_alpha)):
            name = k[len(prefix):] if k.startswith(prefix) else None
            if name is None or prefix not in pre or name not in pre[prefix] \
                    or not v.is_floating_point():
                continue
            assert pre[prefix][name].shape == v.shape, k
            mixed[k] = (a * v.double() + (1 - a) * pre[prefix][name].double()).to(v.dtype)
            n[prefix] += 1
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out)
    save_file({k: t.contiguous() for k, t in mixed.items()}, str(out / "model.safetensors"))
    return {"image_tensors_mixed": n[PREFIX], "text_tensors_mixed": n[TEXT_PREFIX]}


def scores(model: Path, renderings: list[str], text_col: str = "alt_text") -> dict:
    """R@10 in multiples of chance (i->t, t->i) of ``model`` on the dev set's val split and on
    each rendering's val and train concepts, by ``align-ray eval``'s own ``evaluate``."""
    from align_ray.train.eval_parquet import EvalConfig, evaluate

    def score(path: str, split: str) -> dict:
        ev = evaluate(EvalConfig(model=str(model), data=[path], image_col="image",
                                 text_col=text_col, match_col="concept",
                                 split_col="dev_split", split=split))
        return {d: round(ev[d]["R@10"] / ev["chance"]["R@10"], 2)
                for d in ("image_to_text", "text_to_image")}

    row = {"dev_val": score(str(DEV_SET), "val")}
    for p in renderings:
        for split in ("val", "train"):
            row[f"{Path(p).stem}_{split}"] = score(p, split)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--renderings", nargs="*", default=[])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5])
    ap.add_argument("--text-alphas", type=float, nargs="+", default=[1.0],
                    help="the text tower's mix with its pretrained weights (1: as trained)")
    ap.add_argument("--text-col", default="alt_text")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="wise-ft-"))
    for alpha, text_alpha in ((a, t) for t in args.text_alphas for a in args.alphas):
        model = tmp / f"a{alpha}-t{text_alpha}"
        info = interpolate(Path(args.model), alpha, model, text_alpha)
        row = {"alpha": alpha, "text_alpha": text_alpha, **info,
               **scores(model, args.renderings, args.text_col)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.json, {"model": args.model, "metric": "R@10 / chance (i->t, t->i)",
                           "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
