"""``python workflows/end_to_end.py``: data -> filter -> train -> eval -> index -> serve -> report.

With ``bootstrap: {enabled: true}`` in the run YAML (or ``--bootstrap``), round 2 runs between
eval and index: score (the round-1 model scores every downloaded pair) -> filter2 (round 1's rules
+ a score rule) -> train2 (the same budget) -> eval2 (both models on round 1's held-out rows), and
the round-2 model is the one indexed and served.

    python workflows/end_to_end.py                      # embedded: noisy web on 127.0.0.1, tiny model
    python workflows/end_to_end.py --smoke              # the same, smaller (CI)
    python workflows/end_to_end.py --config workflows/configs/local.yaml
    ray job submit --working-dir . -- python workflows/end_to_end.py --config workflows/configs/cloud.yaml

Ray: plain ``ray.init()`` semantics.  Under ``ray job submit`` (or with RAY_ADDRESS) the run
joins that cluster; standalone it starts a local one (no cloud-metadata probes, enough logical
CPUs for the train workers and their data actors).  ``--serve`` leaves the Serve application
running and prints its URL: on a cluster the job ends and the app stays deployed (like ``serve
deploy``); on the local cluster this process keeps it up until Ctrl-C.  Rerunning with the same
output root skips every stage whose outputs are complete.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from align_ray.workflow import config as config_lib
from align_ray.workflow.config import ROUND2_STAGES, STAGES, RunConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="end_to_end.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run YAML (a path or an s3:// URI): sections data/filter/"
                                    "train/index/serve (+ output, web, queries, top_k); e.g. "
                                    "workflows/configs/local.yaml")
    p.add_argument("--smoke", action="store_true", help="the tiny CI variant (on top of --config)")
    p.add_argument("--output", help="output root (local or s3://); overrides the config's")
    p.add_argument("--serve", action="store_true", help="leave the Serve app running, print its URL")
    p.add_argument("--port", type=int, help="Serve HTTP port (default: the serve section's, 8000)")
    p.add_argument("--host", help="Serve HTTP host (default: the serve section's, 127.0.0.1)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset, in order, of {','.join(STAGES)} (default: all; "
                        f"{','.join(ROUND2_STAGES)} only with bootstrap.enabled)")
    p.add_argument("--bootstrap", action="store_true",
                   help="run round 2 (score -> filter2 -> train2 -> eval2): bootstrap.enabled")
    p.add_argument("--fresh", action="store_true", help="delete the output root first")
    p.add_argument("--ray-address", default=None,
                   help="cluster to join (default: ray.init()'s own choice; 'local' starts one)")
    args = p.parse_args(argv)
    args.explicit_stages = args.stages is not None
    args.stages = [s.strip() for s in (args.stages or ",".join(STAGES)).split(",") if s.strip()]
    bad = sorted(set(args.stages) - set(STAGES))
    if bad:
        p.error(f"--stages: unknown stage(s) {bad}; stages: {','.join(STAGES)}")
    return args


def load_config(args: argparse.Namespace) -> RunConfig:
    over: dict = {}
    if args.output:
        over["output"] = args.output
    serve = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    if serve:
        over["serve"] = serve
    if args.bootstrap:
        over["bootstrap"] = {"enabled": True}
    return config_lib.load(args.config, smoke=args.smoke, overrides=over)


def init_ray(cfg: RunConfig, address: str | None) -> bool:
    """Join or start Ray; True when this process started (and so owns) the cluster."""
    import ray
    import ray.data

    from align_ray.train.run import ensure_ray

    was_up = ray.is_initialized()
    # the train stage's own start-up: the stage that needs the most of a local cluster sizes it
    ensure_ray(address)
    node = getattr(ray._private.worker, "_global_node", None)
    owned = not was_up and bool(getattr(node, "head", False))
    # Ray Data's progress bars are for terminals; in job logs our own progress lines suffice
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    res = ray.cluster_resources()
    how = ("started a local cluster" if owned else "using this process's Ray" if was_up
           else f"joined {ray.get_runtime_context().gcs_address}")
    print(f"[ray] {how}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU", flush=True)
    return owned


def fresh(cfg: RunConfig) -> None:
    from align_ray import storage

    fs, root = storage.filesystem(cfg.output)
    if storage.exists(fs, root):
        fs.delete_dir_contents(root, missing_dir_ok=True)


def _print_final(run, report_uri: str, eval_summary: dict | None) -> None:
    print("\n== align-ray end to end ==")
    for name, rec in run.record["stages"].items():
        print(f"  {name:<7} {rec['status']:<8} {rec.get('seconds', 0):>7.1f}s")
    if eval_summary:
        for d in ("image_to_text", "text_to_image"):
            if d in eval_summary:
                m = eval_summary[d]
                print(f"  {d}: R@1 {m['R@1']:.3f} R@5 {m['R@5']:.3f} R@10 {m['R@10']:.3f} "
                      f"(n={eval_summary.get('n')}, chance R@1 "
                      f"{eval_summary.get('chance', {}).get('R@1', float('nan')):.3f})")
    print(f"  total {time.time() - run.t0:.1f}s; report: {report_uri}", flush=True)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except (ValueError, OSError) as e:
        print(f"end_to_end: error: {e}", file=sys.stderr)
        return 2
    round2 = [s for s in args.stages if s in ROUND2_STAGES]
    if round2 and not cfg.bootstrap.enabled:
        if args.explicit_stages:
            print(f"end_to_end: error: --stages {','.join(round2)}: round 2 is off; set "
                  f"bootstrap.enabled in the run YAML or pass --bootstrap", file=sys.stderr)
            return 2
        args.stages = [s for s in args.stages if s not in ROUND2_STAGES]
    if args.fresh:
        fresh(cfg)
    from align_ray.workflow import bootstrap, report, serving, stages

    run = stages.Run(cfg)
    try:  # the output root takes a write before any work: a wrong bucket or endpoint fails here
        run.save()
    except OSError as e:
        print(f"end_to_end: error: cannot write the run record under {cfg.output}: {e}",
              file=sys.stderr)
        return 2
    print(f"align-ray end to end -> {cfg.output} (stages: {','.join(args.stages)})", flush=True)
    if "serve" in args.stages:
        from align_ray.serve import ingress

        ingress.prepare(cfg.serve.ingress, args.ray_address)  # before Ray, as align-ray serve
    owned = init_ray(cfg, args.ray_address)
    if owned and "serve" in args.stages:
        # now, not after the training: this Ray has no autoscaler, and Serve would wait for
        # resources that never come (the serve stage's own deadline is startup_timeout_s)
        import ray

        from align_ray.serve import app

        try:
            app.check_fits(cfg.serve, ray.cluster_resources())
        except ValueError as e:
            print(f"end_to_end: error: serve: {e}", file=sys.stderr)
            ray.shutdown()
            return 2
    from align_ray.workflow.nodes import NodeTimeline

    run.timeline = NodeTimeline().start()
    train_summary: dict = {}
    eval_summary: dict | None = None
    results: list[dict] = []
    url = None
    ok = False
    try:
        if "data" in args.stages:
            stages.data(run)
        if "filter" in args.stages:
            stages.filter_(run)
        if "train" in args.stages:
            train_summary = stages.train(run)
        if "eval" in args.stages:
            eval_summary = stages.evaluate(run, train_summary or {
                "eval": stages.read_json(f"{cfg.train.output.rstrip('/')}/eval.json")})
        round2 = {"folds": bootstrap.folds, "score": bootstrap.score,
                  "filter2": bootstrap.filter2, "train2": bootstrap.train2,
                  "eval2": bootstrap.eval2}
        for name, stage in round2.items():
            if name in args.stages:
                stage(run)
        if "index" in args.stages:
            stages.index(run)
        if "serve" in args.stages:
            url, results = serving.start(run)
        ok = True
    finally:
        run.timeline.stop()
        run.save()
        try:
            uri = report.write(cfg, run.record, results)
        except Exception as e:  # noqa: BLE001 - a failed report must not hide the stage error
            uri = f"(report failed: {type(e).__name__}: {e})"
        _print_final(run, uri, eval_summary)
        if url and not (ok and args.serve):
            serving.stop(cfg.serve.app_name, whole_instance=owned)
    if url and args.serve:
        print(f"\nServe app '{cfg.serve.app_name}' is running at {url}/ "
              f"(API {url}/v1/..., health {url}/healthz)", flush=True)
        if owned:
            print("Ctrl-C stops it (this process owns the local Ray cluster).", flush=True)
            _wait_for_signal()
            serving.stop(cfg.serve.app_name, whole_instance=True)
    if owned:
        import ray

        ray.shutdown()
    return 0
