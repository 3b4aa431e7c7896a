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


def _run_data(args: argparse.Namespace) -> int:
    from align_ray import ray_env
    from align_ray.data.config import DataConfig
    from align_ray.data.errors import InputError
    from align_ray.data import pipeline

    fields = {k: v for k, v in vars(args).items()
              if k not in ("command", "config", "ray_address")}
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
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="align-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parser(sub)
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
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
