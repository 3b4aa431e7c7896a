"""``align-ray`` console script.  Each subcommand = one stage config (a dataclass); flags listed
here are the common ones, every other field of the config can be set in ``--config stage.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from align_ray import config as config_lib


def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download, resize and hash a URL + alt-text list (Ray Data)",
                       description="Stage 1. Every field of DataConfig can be set in --config "
                                   "YAML; flags given here win over the YAML.")
    p.add_argument("--input", help="URL list: parquet/csv/tsv/jsonl[.gz] file, folder or glob, "
                                   "local or s3://")
    p.add_argument("--output", help="output folder, local or s3://")
    p.add_argument("--url-col", dest="url_col")
    p.add_argument("--text-col", dest="text_col")
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--resize-mode", dest="resize_mode",
                   choices=["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"])
    p.add_argument("--allow-cidr", dest="allow_cidr", action="append",
                   help="admit this address range despite the SSRF guard (repeatable)")
    p.add_argument("--allow-private-network", dest="allow_private_network",
                   action="store_const", const=True,
                   help="admit loopback and private ranges (link-local/metadata stay blocked)")
    p.add_argument("--shard-size", dest="shard_size", type=int)
    p.add_argument("--processes", type=int, help="download actors (default: one per CPU)")
    p.add_argument("--threads", type=int, help="in-flight downloads per actor")
    p.add_argument("--retry-failed", dest="retry_failed", action="store_const", const=True,
                   help="re-attempt only rows dropped for retryable reasons")
    p.add_argument("--overwrite", action="store_const", const=True)
    p.add_argument("--config", help="YAML file with DataConfig fields")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to use (default: ray.init()'s own choice; 'local' starts one)")
    p.add_argument("--filter", action="store_true",
                   help="then run ALIGN's frequency filter (align-ray filter) in the same job")
    p.add_argument("--filter-output", default=None,
                   help="where the filtered output goes (default: OUTPUT_filtered)")
    p.add_argument("--filter-config", default=None, help="YAML file with FilterConfig fields")


def _filter_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter", help="ALIGN's frequency filtering of a download-stage output "
                                      "(Ray Data)",
                       description="Stage 2. Every field of FilterConfig can be set in --config "
                                   "YAML; flags given here win over the YAML.")
    p.add_argument("--input", help="download-stage output folder (local or s3://)")
    p.add_argument("--output", help="output folder, same layout (local or s3://)")
    p.add_argument("--eval-set", dest="eval_sets", action="append",
                   help="parquet file/folder of evaluation images; near-duplicates of them are "
                        "removed (repeatable)")
    p.add_argument("--max-texts-per-image", dest="max_texts_per_image", type=int)
    p.add_argument("--max-images-per-text", dest="max_images_per_text", type=int)
    p.add_argument("--vocab-size", dest="vocab_size", type=int)
    p.add_argument("--min-token-count", dest="min_token_count", type=int)
    p.add_argument("--safety-hook", dest="safety_hook", help="package.module:function")
    p.add_argument("--overwrite", action="store_const", const=True)
    p.add_argument("--config", help="YAML file with FilterConfig fields")
    p.add_argument("--ray-address", default=None)


def _run_filter_stage(config: str | None, fields: dict) -> int:
    from align_ray.data.errors import InputError
    from align_ray.filter import pipeline as fpipe
    from align_ray.filter.config import FilterConfig

    try:
        cfg = config_lib.load(FilterConfig, config, **fields)
        stats = fpipe.run(cfg)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"align-ray filter: error: {e}", file=sys.stderr)
        return 2
    if stats.get("report"):
        print(stats["report"])
    print(fpipe.summary_line(stats))
    return 0


def _run_filter(args: argparse.Namespace) -> int:
    from align_ray import ray_env

    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "config", "ray_address")}
    if not fields.get("input") or not fields.get("output"):
        print("align-ray filter: error: --input and --output are required", file=sys.stderr)
        return 2
    ray_env.init(args.ray_address)
    return _run_filter_stage(args.config, fields)


def _run_data(args: argparse.Namespace) -> int:
    from align_ray import ray_env
    from align_ray.data.config import DataConfig
    from align_ray.data.errors import InputError
    from align_ray.data import pipeline

    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "config", "ray_address", "filter", "filter_output",
                           "filter_config")}
    try:
        cfg = config_lib.load(DataConfig, args.config, **fields)
        if not cfg.input or not cfg.output:
            raise ValueError("--input and --output are required (flags or config)")
        pipeline.reader.validate_first(cfg)  # fail fast, before starting Ray
        ray_env.init(args.ray_address)
        stats = pipeline.run(cfg)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"align-ray data: error: {e}", file=sys.stderr)
        return 2
    print(pipeline.summary_line(stats))
    if args.filter:
        out = args.filter_output or f"{cfg.output.rstrip('/')}_filtered"
        return _run_filter_stage(args.filter_config, {"input": cfg.output, "output": out})
    return 0


def _index_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="embed a corpus into a search index (Ray Data batch inference)",
                       description="Every field of IndexConfig can be set in --config YAML.")
    p.add_argument("--model", help="save_pretrained model directory")
    p.add_argument("--data", help="data-stage output dir, or any parquet file/dir/glob with "
                                  "image bytes + text columns (local or s3://)")
    p.add_argument("--output", help="index directory to write")
    p.add_argument("--image-col", dest="image_col", help="default: jpg if present, else image")
    p.add_argument("--text-col", dest="text_col")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--concurrency", type=int, help="encoder actors")
    p.add_argument("--num-gpus", dest="num_gpus", type=float, help="GPUs per encoder actor")
    p.add_argument("--limit", type=int, help="index only the first N rows")
    p.add_argument("--overwrite", action="store_const", const=True)
    p.add_argument("--config", help="YAML file with IndexConfig fields")
    p.add_argument("--ray-address", default=None)


def _run_index(args: argparse.Namespace) -> int:
    from align_ray import ray_env
    from align_ray.serve import index
    from align_ray.serve.config import IndexConfig

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "config", "ray_address")}
    try:
        cfg = config_lib.load(IndexConfig, args.config, **fields)
        if not (cfg.model and cfg.data and cfg.output):
            raise ValueError("--model, --data and --output are required (flags or config)")
        index.resolve_input(cfg)  # fail fast, before starting Ray
        ray_env.init(args.ray_address)
        manifest = index.build(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"align-ray index: error: {e}", file=sys.stderr)
        return 2
    print(f"index: {manifest['count']} pairs ({manifest['dropped']} dropped), dim {manifest['dim']}, "
          f"{manifest['seconds']} s -> {cfg.output}")
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve embedding, search and classification over HTTP "
                                     "(Ray Serve)",
                       description="Every field of ServeConfig can be set in --config YAML "
                                   "(nested sections: image_encoder, text_encoder, router, limits).")
    p.add_argument("--model", help="save_pretrained model directory")
    p.add_argument("--index", help="index directory from `align-ray index`")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--backend", choices=["exact", "faiss"])
    p.add_argument("--config", help="YAML file with ServeConfig fields")
    p.add_argument("--ray-address", default=None)


def _run_serve(args: argparse.Namespace) -> int:
    import yaml

    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    data: dict = {}
    try:
        if args.config:
            data = yaml.safe_load(open(args.config)) or {}
        data.update({k: v for k, v in vars(args).items()
                     if k not in ("command", "config", "ray_address") and v is not None})
        cfg = ServeConfig.from_dict(data)
        app.check_paths(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"align-ray serve: error: {e}", file=sys.stderr)
        return 2
    return app.run(cfg, args.ray_address)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the dual encoder on Ray Train (gathered negatives)",
                       description="Every field of TrainConfig (model: {preset: tiny|align, ...} "
                                   "included) can be set in --config YAML; flags win over it. "
                                   "Re-running with the same --output (and name) resumes.")
    p.add_argument("--data", action="append", help="parquet input: stage output dir, file, folder "
                                                   "or glob, local or s3:// (repeatable)")
    p.add_argument("--output", help="run directory (model/, metrics.jsonl, curves.png, eval.json)")
    p.add_argument("--workers", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per worker")
    p.add_argument("--steps", type=int)
    p.add_argument("--image-col", dest="image_col")
    p.add_argument("--text-col", dest="text_col")
    p.add_argument("--val-data", dest="val_data", action="append")
    p.add_argument("--split-col", dest="split_col")
    p.add_argument("--val-fraction", dest="val_fraction", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--storage-path", dest="storage_path", help="checkpoints (local or s3://)")
    p.add_argument("--name", help="run name under the storage path (resume key)")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True)
    p.add_argument("--config", help="YAML file with TrainConfig fields")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to use (default: ray.init()'s own choice; 'local' starts one)")


def _run_train(args: argparse.Namespace) -> int:
    import json

    from align_ray.train.config import TrainConfig

    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "config", "ray_address")}
    try:
        cfg = config_lib.load(TrainConfig, args.config, **fields)
        if not cfg.data or not cfg.output:
            raise ValueError("--data and --output are required (flags or config)")
        from align_ray.train.ingest import resolve_inputs

        resolve_inputs(cfg.data)  # fail fast, before starting Ray
        from align_ray.train.run import run

        summary = run(cfg, address=args.ray_address)
    except (ValueError, FileNotFoundError) as e:
        print(f"align-ray train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot retrieval (+ classification) of a saved model",
                       description="Prints one JSON object: image_to_text / text_to_image "
                                   "(R@1, R@5, R@10, mean_rank, median_rank), chance, and "
                                   "zero_shot (top1, top5) with --classify-col.")
    p.add_argument("--model", required=True, help="a save_pretrained dir (RUN_DIR/model)")
    p.add_argument("--data", required=True, action="append", help="parquet file/folder/glob")
    p.add_argument("--image-col", dest="image_col", default="image")
    p.add_argument("--text-col", dest="text_col", default="text")
    p.add_argument("--match-col", dest="match_col",
                   help="rows sharing this value count as correct for each other")
    p.add_argument("--classify-col", dest="classify_col", help="class label column (zero-shot)")
    p.add_argument("--template", dest="templates", action="append",
                   help="prompt template with {} (repeatable; default: 'a photo of a {}.', '{}')")
    p.add_argument("--split-col", dest="split_col", help="only rows whose SPLIT_COL == --split")
    p.add_argument("--split")
    p.add_argument("--max-rows", dest="max_rows", type=int)
    p.add_argument("--device", default="cpu")


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from align_ray.train.eval_parquet import EvalConfig, evaluate

    fields = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        if bool(args.split_col) != bool(args.split):
            raise ValueError("--split-col and --split go together")
        result = evaluate(EvalConfig(**fields))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"align-ray eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="align-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parser(sub)
    _filter_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _index_parser(sub)
    _serve_parser(sub)
    sub.add_parser("demo-web", add_help=False,
                   help="serve the built-in noisy web on 127.0.0.1 and write its URL list")
    sub.add_parser("demo", add_help=False,
                   help="run the data stage on the built-in noisy web (local demo)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo-web"]:
        from align_ray.web.server import main as web_main
        return web_main(argv[1:]) or 0
    if argv[:1] == ["demo"]:
        from align_ray.demo import main as demo_main
        return demo_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "data":
        return _run_data(args)
    if args.command == "filter":
        return _run_filter(args)
    if args.command == "train":
        return _run_train(args)
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "index":
        return _run_index(args)
    if args.command == "serve":
        return _run_serve(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
