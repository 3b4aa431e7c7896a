"""R@10 (multiples of chance) per variant and per held-out set, from quality_vs_plain.py result
files: one row per set and direction, one column per variant (its per-seed values and their mean
± standard error), so a BENCHMARKS.md table can be rebuilt from the files it names.

    .venv/bin/python benchmarks/quality_table.py \\
        --variant "plain, uniform batches=plain:benchmarks/results/*-plain-detvocab-seed*.json" \\
        --variant "align-ray defaults=align_ray:benchmarks/results/*-ar-detvocab-seed*.json"

A variant is ``LABEL=SIDE:GLOB[,GLOB...]`` (SIDE: plain or align_ray, the key the runs sit
under; quote the globs). A seed found in several files keeps the last file's run (sorted by name).
``--diff A B`` adds a column "A − B": the difference of the two means ± its standard error
(the two variants draw different batches from a seed, so they are compared as two samples).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_vs_plain import x_chance  # noqa: E402

SETS = [("dev val", None, "val")] + [(f"{a} {s}", f"emoji_{a.lower()}_dev", s)
                                     for a in ("Twemoji", "OpenMoji", "Fluent")
                                     for s in ("val", "train")]
DIRS = (("i→t", "image_to_text"), ("t→i", "text_to_image"))


def load(spec: str) -> tuple[str, dict[int, dict]]:
    label, rest = spec.split("=", 1)
    side, pattern = rest.split(":", 1)
    runs: dict[int, dict] = {}
    for path in sorted(p for pat in pattern.split(",") for p in glob.glob(pat)):
        for run in json.load(open(path)).get(side, {}).get("runs", []):
            runs[run["seed"]] = run
    if not runs:
        raise SystemExit(f"{label}: no {side} runs in {pattern}")
    return label, runs


def r10(run: dict, style: str | None, split: str, direction: str) -> float | None:
    ev = run["eval"] if style is None else run.get("renderings", {}).get(style, {}).get(split)
    return None if ev is None else x_chance(ev)[direction]["R@10"]


def mean_se(xs: list[float]) -> tuple[float, float]:
    return st.mean(xs), (st.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="LABEL=SIDE:GLOB")
    ap.add_argument("--diff", nargs=2, action="append", default=[], metavar=("A", "B"))
    args = ap.parse_args()
    variants = dict(load(v) for v in args.variant)
    head = [f"{lb} (seeds {','.join(map(str, sorted(rs)))})" for lb, rs in variants.items()]
    head += [f"{a} − {b}" for a, b in args.diff]
    print("| set, direction | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for name, style, split in SETS:
        for arrow, direction in DIRS:
            vals = {lb: [v for s in sorted(rs) if (v := r10(rs[s], style, split, direction)) is not None]
                    for lb, rs in variants.items()}
            if not all(vals.values()):
                continue
            cells = []
            for xs in vals.values():
                m, se = mean_se(xs)
                cells.append(f"{' '.join(f'{x:.1f}' for x in xs)} → **{m:.2f}** ± {se:.2f}")
            for a, b in args.diff:
                (ma, sa), (mb, sb) = mean_se(vals[a]), mean_se(vals[b])
                cells.append(f"{ma - mb:+.2f} ± {math.hypot(sa, sb):.2f}")
            print(f"| {name}, {arrow} | " + " | ".join(cells) + " |")
    losses = {lb: " ".join(f"{rs[s]['curve'][-1]['loss']:.2f}" for s in sorted(rs))
              for lb, rs in variants.items()}
    print("\nfinal training loss (last 10 steps): " + "; ".join(f"{k} {v}" for k, v in losses.items()))


if __name__ == "__main__":
    main()
