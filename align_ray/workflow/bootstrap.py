"""Round 2 of the workflow (``bootstrap.enabled``): [folds ->] score -> filter2 -> train2 -> eval2.

The round-1 model scores every downloaded row, the filter runs again with round 1's rules plus
a score rule, round 2 trains on what it keeps with the same budget, and ``eval2`` compares the
two models on the same held-out rows.  Each stage resumes and is skipped when complete, as the
round-1 stages are (:mod:`align_ray.workflow.stages`).  They run only with ``bootstrap.enabled``
(main.py leaves them out otherwise).
"""

from __future__ import annotations

import dataclasses
import json

from align_ray import storage
from align_ray.layout import Layout
from align_ray.workflow import stages
from align_ray.workflow.stages import Run, StepPrinter, _train_done, read_json


def fold_configs(run: Run) -> list:
    """The cross-fitting models' train configs: round 1's, minus one caption-hash fold each."""
    cfg, b = run.cfg, run.cfg.bootstrap
    return [dataclasses.replace(cfg.train, folds=b.folds, fold=i,
                                output=f"{b.output.rstrip('/')}/fold{i}",
                                name=f"{cfg.train.name}-fold{i}", storage_path=None)
            for i in range(b.folds)] if b.folds >= 2 else []


def folds(run: Run) -> dict:
    """Train the cross-fitting models (bootstrap.folds >= 2; nothing to do otherwise)."""
    from align_ray.train.run import run as train_run

    todo = fold_configs(run)
    if not todo:   # bootstrap.folds < 2: the round-1 model scores; no stage to record
        return {}
    with run.stage("folds") as rec:
        done = []
        for tcfg in todo:
            if _train_done(tcfg.output) is not None:
                print(f"[folds] {tcfg.output} holds a trained model: skipped", flush=True)
                done.append(tcfg.output)
                continue
            print(f"[folds] fold {tcfg.fold}/{tcfg.folds}: {tcfg.steps} steps without the rows "
                  f"of caption-hash fold {tcfg.fold} -> {tcfg.output}", flush=True)
            train_run(tcfg, step_hook=StepPrinter(tcfg.steps, tcfg.log_every, "folds"))
        rec["summary"] = {"folds": len(todo), "models": [f"{t.output}/model" for t in todo],
                          "skipped": done}
        if len(done) == len(todo):
            rec["status"] = "skipped"
        return rec["summary"]


def score(run: Run) -> dict:
    from align_ray.score import pipeline as spipe

    scfg = run.cfg.bootstrap.score
    with run.stage("score") as rec:
        out = Layout(scfg.output)
        if out.is_complete() and not scfg.overwrite:
            rec.update(status="skipped", summary=out.stats())
            print(f"[score] {scfg.output} is complete: " + spipe.summary_line(rec["summary"]))
            return rec["summary"]
        own = scfg.model.rstrip("/") == f"{run.cfg.train.output.rstrip('/')}/model"
        who = (f"{len(scfg.fold_models)} cross-fitted round-1 models" if scfg.fold_models
               else f"{'round-1 model' if own else 'model (bootstrap.score.model)'} {scfg.model}")
        print(f"[score] {who} score {scfg.input}", flush=True)
        stats = spipe.run(scfg)
        if not stats.get("complete"):
            raise RuntimeError(f"score stage incomplete ({scfg.output}); rerun to resume")
        rec["summary"] = stats
        print(spipe.summary_line(stats), flush=True)
        return stats


def filter2(run: Run) -> dict:
    """Round 1's filter stage with round 2's config: the same rules + the score rules."""
    return stages.filter_(run, run.cfg.bootstrap.filter, "filter2")


def train2(run: Run) -> dict:
    """Round 1's train stage with round 2's config: the same budget on what filter2 kept."""
    return stages.train(run, run.cfg.bootstrap.train, "train2")


def eval2(run: Run) -> dict:
    """Both rounds' models on the same rows: round 1's held-out split (its val_data, its
    split_col's val rows, or its caption-hash holdout of round 1's filtered rows)."""
    from align_ray.train.eval_parquet import EvalConfig, evaluate

    cfg = run.cfg
    with run.stage("eval2") as rec:
        old = read_json(f"{cfg.bootstrap.output.rstrip('/')}/eval2.json")
        if old is not None:
            rec.update(status="skipped", summary=old)
            return old
        from align_ray.train.selection import selections

        _, val = selections(cfg.train)   # (paths, Selection) of round 1's held-out rows
        if val is None:
            raise ValueError("eval2 compares the rounds on round 1's held-out rows: set "
                             "train.val_fraction, train.split_col or train.val_data")
        paths, selection = val
        out: dict = {"heldout": {"data": paths, "selection": dataclasses.asdict(selection)}}
        t = cfg.train
        for name, model in (("round1", f"{t.output.rstrip('/')}/model"),
                            ("round2", f"{cfg.bootstrap.train.output.rstrip('/')}/model")):
            ecfg = EvalConfig(model=model, data=list(paths), image_col=t.image_col,
                              text_col=t.text_col, match_col=t.val_match_col,
                              max_rows=t.val_max_rows, batch_size=t.eval_batch_size)
            out[name] = evaluate(ecfg, selection=selection)
        for d in ("image_to_text", "text_to_image"):
            a, b = out["round1"][d], out["round2"][d]
            print(f"[eval2] {d} on the same {out['round1']['n']} held-out rows: R@10 round 1 "
                  f"{a['R@10']:.3f} -> round 2 {b['R@10']:.3f}", flush=True)
        fs, root = storage.filesystem(cfg.bootstrap.output)
        storage.write_bytes(fs, storage.join(root, "eval2.json"),
                            json.dumps(out, indent=1).encode())
        rec["summary"] = out
        return out
