"""SemDeDup against known semantic duplicates: one emoji concept drawn by two artists (issue 17).

The built-in noisy web's duplicates are re-encodings, which the pHash rule already finds.
SemDeDup is meant for *semantic* duplicates: the same thing in a different picture. This corpus
has them with ground truth. It holds every row of the shared Noto dev set plus, for a seeded
``--dup-fraction`` of its concepts, that concept's drawing by another artist (Twemoji, OpenMoji
or Fluent, from ``benchmarks/other_renderings.py``), with the same caption. A copy is
*redundant* when its concept has another row.

What runs, as a user runs it:

1. ``align-ray data``: the images served over HTTP on 127.0.0.1, downloaded like any crawl;
2. ``align-ray score --model M`` (image embeddings + pair scores);
3. ``align-ray filter --semdedup --semdedup-eps E --near-dup-distance D`` at ``--check-eps``,
   with the rules that do not apply to 64 px emoji turned off. The pHash rule runs beside it.

A drop is right when the kept row it names (the stage's detail: "to key K") is the same
concept. Then the eps sweep: the stage's own within-cluster rule (``semdedup.cluster_drops``) over the
scored rows the other rules kept, in this process. With fewer than 10 k rows the stage uses one k-means cluster, so
the rule sees every pair exactly as the stage does; the script checks that the stage dropped
the same keys at ``--check-eps``.

    .venv/bin/python benchmarks/semdedup_renderings.py \\
        --model /tmp/qvp-style05/ar-seed0/model --out benchmarks/results/semdedup-renderings.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _bench_common import prepare_env  # noqa: E402
from bench_bootstrap import ImageServer  # noqa: E402

from align_ray.filter.semdedup import cluster_drops, unit_rows  # noqa: E402
from tests.conftest import DEV_SET  # noqa: E402

OTHERS = ["twemoji", "openmoji", "fluent"]
COLS = ["image", "alt_text", "concept", "dev_split", "category"]
# rules meant for web photos and alt-texts: 64 px drawings and emoji names fail them all
OFF = ["image_too_small", "aspect_ratio", "too_few_tokens", "too_many_tokens",
       "image_too_many_texts", "text_too_many_images", "rare_token"]


def build_corpus(frac: float, seed: int) -> tuple[pa.Table, dict]:
    noto = pq.read_table(DEV_SET, columns=COLS)
    noto = noto.append_column("style", pa.array(["noto"] * noto.num_rows))
    others = {s: pq.read_table(REPO / f"benchmarks/data/emoji_{s}_dev.parquet", columns=COLS)
              for s in OTHERS}
    by_style = {s: {c: i for i, c in enumerate(t.column("concept").to_pylist())}
                for s, t in others.items()}
    rng = np.random.default_rng(seed)
    concepts = noto.column("concept").to_pylist()
    chosen = rng.choice(len(concepts), size=round(frac * len(concepts)), replace=False)
    parts = [noto]
    for i in sorted(chosen):
        c = concepts[i]
        styles = [s for s in OTHERS if c in by_style[s]]
        s = styles[rng.integers(len(styles))]
        row = others[s].slice(by_style[s][c], 1)
        parts.append(row.append_column("style", pa.array([s])))
    table = pa.concat_tables(parts)
    return table, {"rows": table.num_rows, "noto_rows": noto.num_rows, "copies": len(chosen),
                   "copies_by_style": {s: int(pc.sum(pc.equal(table.column("style"), s)).as_py()
                                              or 0) for s in OTHERS}}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ).returncode
    if rc != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed ({rc}); see {log}")
    return round(time.monotonic() - t0, 1)


def judge(drops: dict[int, int], key: np.ndarray, concept: np.ndarray, split: np.ndarray) -> dict:
    """``drops``: dropped key -> the kept key it was judged a duplicate of. A drop is right when
    that row is the same concept; recall is right drops over the redundant copies."""
    concept_of = dict(zip(key.tolist(), concept))
    counts: dict[str, int] = {}
    for c in concept:
        counts[c] = counts.get(c, 0) + 1
    out = {}
    for name, mask in (("all", np.ones(len(key), bool)), ("train concepts", split == "train"),
                       ("val concepts", split == "val")):
        redundant = sum(counts[c] - 1 for c in set(concept[mask]))
        mine = [k for k in key[mask].tolist() if k in drops]
        right = sum(concept_of[k] == concept_of.get(drops[k]) for k in mine)
        out[name] = {"drops": len(mine), "right": int(right), "redundant": redundant,
                     "precision": round(right / len(mine), 3) if mine else None,
                     "recall": round(right / redundant, 3) if redundant else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the scorer: any align-ray score --model spec")
    ap.add_argument("--dup-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, nargs="+",
                    default=[0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3])
    ap.add_argument("--check-eps", type=float, default=0.05, help="eps of the filter-stage run")
    ap.add_argument("--near-dup-distance", type=int, default=8)
    ap.add_argument("--phash-distances", type=int, nargs="+", default=[0, 2, 4, 6, 8, 10, 12])
    ap.add_argument("--workdir", default="/tmp/semdedup-renderings")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/semdedup-renderings.json"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prepare_env(work)
    table, corpus = build_corpus(args.dup_fraction, args.seed)
    print("corpus:", corpus, flush=True)
    server = ImageServer(table.column("image").to_pylist())
    pq.write_table(pa.table({
        "url": [f"{server.url}/img/{i}.png" for i in range(table.num_rows)],
        "caption": table.column("alt_text"), "concept": table.column("concept"),
        "dev_split": table.column("dev_split"), "style": table.column("style")}),
        work / "urls.parquet")
    bin_ = str(Path(sys.executable).parent / "align-ray")
    try:
        data_s = run([bin_, "data", "--input", str(work / "urls.parquet"), "--output",
                      str(work / "data"), "--image-size", "64", "--extra-cols", "concept",
                      "--extra-cols", "dev_split", "--extra-cols", "style",
                      "--no-write-webdataset", "--allow-cidr", "127.0.0.0/8", "--max-per-host",
                      "64", "--no-respect-robots-txt", "--overwrite"], work / "data.log")
    finally:
        server.stop()
    score_s = run([bin_, "score", "--model", args.model, "--input", str(work / "data"),
                   "--output", str(work / "scored"), "--overwrite"], work / "score.log")
    filter_cmd = [bin_, "filter", "--input", str(work / "scored"), "--output",
                  str(work / "filtered"), "--semdedup", "--semdedup-eps", str(args.check_eps),
                  "--near-dup-distance", str(args.near_dup_distance), "--no-write-webdataset",
                  "--no-report", "--overwrite"]
    for r in OFF:
        filter_cmd += ["--disabled-rules", r]
    filter_s = run(filter_cmd, work / "filter.log")

    scored = pads.dataset(str(work / "scored" / "parquet"), format="parquet").to_table(
        columns=["key", "image_embedding", "pair_score", "concept", "dev_split", "style",
                 "phash"])
    key = np.asarray([int(k) for k in scored.column("key").to_pylist()], np.int64)
    concept = np.asarray(scored.column("concept").to_pylist())
    split = np.asarray(scored.column("dev_split").to_pylist())
    style = np.asarray(scored.column("style").to_pylist())
    emb = unit_rows(scored.column("image_embedding"))
    score = scored.column("pair_score").to_numpy(zero_copy_only=False)

    dropped = pads.dataset(str(work / "filtered" / "dropped"), format="parquet").to_table()
    reasons = dropped.column("reason").to_pylist()
    by_reason: dict[str, dict[int, int]] = {}
    for k, r, d in zip(dropped.column("key").to_pylist(), reasons,
                       dropped.column("detail").to_pylist()):
        named = re.search(r"key (\d+)", d or "")
        by_reason.setdefault(r, {})[int(k)] = int(named.group(1)) if named else -1
    stage_sem = by_reason.get("semantic_duplicate", {})
    stage_near = by_reason.get("near_duplicate", {})
    # SemDeDup sees only the rows every other rule kept: check the stage on those
    others = {k for r, ks in by_reason.items() if r != "semantic_duplicate" for k in ks}
    live = np.asarray([k not in others for k in key])

    # what bounds any eps: is a copy's nearest image its own concept's other drawing?
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.argmax(axis=1)
    copy = style != "noto"
    nearest = {"copies": int(copy.sum()),
               "nearest_is_same_concept": round(float((concept[nn] == concept)[copy].mean()), 3),
               "cosine_to_own_concept_median": round(float(np.median(
                   [sims[i][(concept == concept[i]) & (style == "noto")].max()
                    for i in np.flatnonzero(copy)])), 4),
               "cosine_to_nearest_median": round(float(np.median(sims.max(axis=1))), 4)}
    # the pHash rule's view, per distance: the pairs it would call near-duplicates
    ph = scored.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
    dist = np.bitwise_count(ph[:, None] ^ ph[None, :])
    same = concept[:, None] == concept[None, :]
    upper = np.triu(np.ones_like(same), 1)
    phash_pairs = []
    for d in args.phash_distances:
        close = (dist <= d) & upper
        own = [(dist[i][(concept == concept[i]) & (style == "noto")] <= d).any()
               for i in np.flatnonzero(copy)]
        phash_pairs.append({"distance": d, "pairs": int(close.sum()),
                            "same_concept": int((close & same).sum()),
                            "copies_within_d_of_their_noto": round(float(np.mean(own)), 3)})
    concept_of, style_of = dict(zip(key.tolist(), concept)), dict(zip(key.tolist(), style))
    sweep = []
    for eps in args.eps:
        drops = {k: kept for k, (kept, _) in
                 cluster_drops(key[live], score[live], emb[live], eps).items()}
        kept_style = [style_of[kept] for k, kept in drops.items()
                      if concept_of[k] == concept_of[kept]]
        sweep.append({"eps": eps, **judge(drops, key, concept, split),
                      "right drops that kept the noto drawing": round(
                          kept_style.count("noto") / len(kept_style), 3) if kept_style else None})
        if abs(eps - args.check_eps) < 1e-12 and drops != stage_sem:
            sys.exit(f"the stage dropped other keys than the rule at eps {eps}: "
                     f"{len(set(stage_sem.items()) ^ set(drops.items()))} differ")
    rec = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "model": args.model,
           "dup_fraction": args.dup_fraction, "seed": args.seed, "corpus": corpus,
           "data_s": data_s, "score_s": score_s, "filter_s": filter_s,
           "downloaded": int(scored.num_rows),
           "filter_drops": {r: len(ks) for r, ks in by_reason.items()},
           "check_eps": args.check_eps,
           "stage_semdedup": judge(stage_sem, key, concept, split),
           "stage_matches_rule": True,
           "near_duplicate": {"distance": args.near_dup_distance,
                              **judge(stage_near, key, concept, split)},
           "random_precision": round(corpus["copies"] / corpus["rows"], 3),
           "nearest": nearest,
           "phash_pairs": phash_pairs,
           "sweep": sweep}
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "sweep"}, indent=1))
    for s in sweep:
        a = s["all"]
        print(f"eps {s['eps']:<6} drops {a['drops']:5d}  precision {a['precision']}  "
              f"recall {a['recall']}  val-concept recall {s['val concepts']['recall']}  "
              f"noto kept {s['right drops that kept the noto drawing']}")


if __name__ == "__main__":
    main()
