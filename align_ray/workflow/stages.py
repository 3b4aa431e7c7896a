"""Each stage of the workflow, run with the code its CLI subcommand runs, and skipped when its
outputs are complete (so a rerun after a failure resumes at the first incomplete stage; the
data and train stages also resume *inside* themselves: finished shards, the last checkpoint).

Completion: data/filter directories by :func:`align_ray.layout.Layout.is_complete` (their
``stats.json`` says ``complete: true``); train ``eval.json`` + ``model/config.json`` (eval.json
is written last); index ``index.json``.

Every stage takes ``s3://`` locations natively (training too: its run directory, checkpoints,
metrics and TensorBoard events are written to the URI, train/run.py).  The index actors
load the model from S3 and write their shards there, and every Serve replica loads the model and
index itself, so they work across nodes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from typing import Any, Iterator

from align_ray import storage
from align_ray.layout import Layout
from align_ray.workflow.config import RunConfig, to_dict


def read_json(uri: str) -> dict | None:
    fs, path = storage.filesystem(uri)
    if not storage.exists(fs, path):
        return None
    return json.loads(storage.read_bytes(fs, path))


class Run:
    """Per-stage status, timing and summary, printed as it goes and saved to ROOT/workflow.json."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.t0 = time.time()
        self.record: dict[str, Any] = {"config": to_dict(cfg), "stages": {}}
        self.timeline = None   # a workflow.nodes.NodeTimeline once Ray is up (main.py)

    def save(self) -> None:
        fs, root = storage.filesystem(self.cfg.output)
        self.record["seconds"] = round(time.time() - self.t0, 1)
        if self.timeline is not None:
            self.record["nodes"] = self.timeline.record()
        storage.write_bytes(fs, storage.join(root, "workflow.json"),
                            json.dumps(self.record, indent=1, default=str).encode())

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Yields the stage's record: set ``status`` (default "ran") and ``summary`` in it."""
        rec: dict[str, Any] = {"status": "ran"}
        t = time.time()
        print(f"\n[{name}] starting (t+{t - self.t0:.0f}s)", flush=True)
        if self.timeline is not None:
            self.timeline.enter(name)
        try:
            yield rec
        except BaseException as e:
            rec.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if self.timeline is not None:
                self.timeline.enter("")
            rec["seconds"] = round(time.time() - t, 1)
            self.record["stages"][name] = rec
            self.save()
            print(f"[{name}] {rec['status']} in {rec['seconds']:.1f}s "
                  f"(t+{time.time() - self.t0:.0f}s)", flush=True)


def data(run: Run) -> dict:
    from align_ray.data import pipeline
    from align_ray.workflow import web

    cfg = run.cfg
    with run.stage("data") as rec:
        out = Layout(cfg.data.output)
        if out.is_complete() and not cfg.data.overwrite:
            old = out.stats()
            rec.update(status="skipped", summary=old)
            print(f"[data] {cfg.data.output} is complete: " + pipeline.summary_line(old))
            return old
        if cfg.embedded:
            with web.serving(cfg) as urls:
                stats = pipeline.run(dataclasses.replace(cfg.data, input=urls))
        else:
            stats = pipeline.run(cfg.data)
        if not stats.get("complete"):
            raise RuntimeError(f"data stage incomplete ({cfg.data.output}); rerun to resume")
        rec["summary"] = stats
        print(pipeline.summary_line(stats), flush=True)
        return stats


def filter_(run: Run, fcfg=None, name: str = "filter") -> dict:
    """The filter stage; round 2 (workflow/bootstrap.py) runs it with its own config and name."""
    from align_ray.filter import pipeline as fpipe

    fcfg = fcfg or run.cfg.filter
    with run.stage(name) as rec:
        out = Layout(fcfg.output)
        if out.is_complete(input=fcfg.input) and not fcfg.overwrite:
            old = out.stats()
            rec.update(status="skipped", summary=old)
            print(f"[{name}] {fcfg.output} is complete: " + fpipe.summary_line(old))
            return old
        stats = fpipe.run(fcfg)
        rec["summary"] = {k: v for k, v in stats.items() if k != "vocab"}
        if stats.get("report"):
            print(stats["report"])
        print(fpipe.summary_line(stats), flush=True)
        return stats


class StepPrinter:
    """Training progress from rank 0 (runs inside the Ray Train worker; printed by the driver)."""

    def __init__(self, total: int, every: int, name: str = "train"):
        self.total, self.every, self.t0, self.name = total, max(1, every), None, name

    def __call__(self, step: int, rank: int) -> None:
        if rank != 0:
            return
        self.t0 = self.t0 or time.time()
        if step % self.every == 0 or step == self.total:
            print(f"[{self.name}] step {step}/{self.total} ({time.time() - self.t0:.0f}s)",
                  flush=True)


def _train_done(uri: str) -> dict | None:
    """eval.json, when ``uri`` also holds the saved model: our own or an HF model's
    ``config.json``, or an open_clip fine-tune's ``open_clip_config.json`` (``--init-from``
    saves in the source's format)."""
    from align_ray.model.external import OPEN_CLIP_CONFIG

    ev = read_json(f"{uri.rstrip('/')}/eval.json")
    model = any(read_json(f"{uri.rstrip('/')}/model/{name}") is not None
                for name in ("config.json", OPEN_CLIP_CONFIG))
    return ev if ev is not None and model else None


def train(run: Run, tcfg=None, name: str = "train") -> dict:
    """The train stage; round 2 (workflow/bootstrap.py) runs it with its own config and name."""
    from align_ray.train.run import run as train_run

    tcfg = dataclasses.replace(tcfg or run.cfg.train)
    with run.stage(name) as rec:
        done = _train_done(tcfg.output)
        if done is not None:
            rec.update(status="skipped", summary={"eval": done, "output": tcfg.output})
            print(f"[{name}] {tcfg.output} holds a trained model and eval.json: skipped")
            return rec["summary"]
        print(f"[{name}] {tcfg.workers} workers x batch {tcfg.batch_size}, {tcfg.steps} steps on "
              f"{tcfg.data}, model {tcfg.model.image_model}@{tcfg.model.image_size}px, "
              f"checkpoints in {tcfg.resolved_storage()}", flush=True)
        summary = train_run(tcfg, step_hook=StepPrinter(tcfg.steps, tcfg.log_every, name))
        rec["summary"] = summary
        print(f"[{name}] step {summary['step']}, final loss {summary['final_loss']}, "
              f"temperature {summary['temperature']}, model -> {summary['model_dir']}", flush=True)
        return summary


def evaluate(run: Run, train_summary: dict) -> dict:
    """Final retrieval metrics: the train stage's held-out eval (eval.json), or, when the run
    has no validation split, the same evaluation on (up to 1000) filtered training rows."""
    from align_ray.train.eval_parquet import EvalConfig
    from align_ray.train.eval_parquet import evaluate as eval_parquet

    cfg = run.cfg
    with run.stage("eval") as rec:
        metrics = dict(train_summary.get("eval") or {})
        source = "held-out validation split (train stage, eval.json)"
        if "image_to_text" not in metrics:
            metrics = eval_parquet(EvalConfig(model=cfg.index.model, data=[cfg.index.data],
                                              image_col=cfg.train.image_col,
                                              text_col=cfg.train.text_col, max_rows=1000))
            source = "filtered training data (no validation split configured)"
        rec["summary"] = {"source": source, **metrics}
        print(f"[eval] {source}")
        for d in ("image_to_text", "text_to_image"):
            if d in metrics:
                m = metrics[d]
                print(f"[eval] {d}: R@1 {m['R@1']:.3f}  R@5 {m['R@5']:.3f}  R@10 {m['R@10']:.3f}  "
                      f"median rank {m['median_rank']}  (n={metrics.get('n')}, "
                      f"chance R@1 {metrics.get('chance', {}).get('R@1', float('nan')):.3f})",
                      flush=True)
        return rec["summary"]


def index(run: Run) -> dict:
    from align_ray.serve import index as index_lib

    cfg = run.cfg
    with run.stage("index") as rec:
        old = read_json(f"{cfg.index.output.rstrip('/')}/index.json")
        if old is not None and not cfg.index.overwrite:
            rec.update(status="skipped", summary=old)
            print(f"[index] {cfg.index.output} holds an index of {old['count']} pairs: skipped")
            return old
        icfg = dataclasses.replace(cfg.index)
        if old is None:   # an unfinished earlier attempt may have left shards: start over
            icfg.overwrite = True
        manifest = index_lib.build(icfg)   # model and output local or s3:// (read/written natively)
        rec["summary"] = manifest
        print(f"[index] {manifest['count']} pairs ({manifest['dropped']} dropped), dim "
              f"{manifest['dim']}, {manifest['seconds']}s -> {cfg.index.output}", flush=True)
        return manifest
