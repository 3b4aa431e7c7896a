"""The embedded noisy web: the data stage's input when a run names no URL list.

The URL list (ROOT/urls.parquet) embeds the server's port, and the download stage refuses to
resume over a different input, so the port is recorded in ROOT/web.json and a resumed run
serves on the same one (and never rewrites the list).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from align_ray import storage
from align_ray.workflow.config import RunConfig


def _upload(local: Path, uri: str) -> None:
    fs, path = storage.filesystem(uri)
    storage.write_bytes(fs, path, local.read_bytes())


@contextmanager
def serving(cfg: RunConfig) -> Iterator[str]:
    """Start the noisy web (as ``cfg.web`` says) and yield the URL-list URI for the data stage."""
    from align_ray.web.server import NoisyWeb

    fs, root = storage.filesystem(cfg.output)
    urls_path, meta_path = storage.join(root, "urls.parquet"), storage.join(root, "web.json")
    urls_uri = f"{cfg.output.rstrip('/')}/urls.parquet"
    port = cfg.web.port
    resume = storage.exists(fs, urls_path) and storage.exists(fs, meta_path)
    if resume:
        port = int(json.loads(storage.read_bytes(fs, meta_path))["port"])
    web = NoisyWeb(host=cfg.web.host, port=port, seed=cfg.web.seed)
    try:
        web.start()
    except OSError as e:
        raise RuntimeError(f"cannot serve the noisy web on {cfg.web.host}:{port} ({e}); the URL "
                           f"list of {cfg.output} names that port: free it, or start over with "
                           "--fresh") from None
    try:
        if not resume:
            rows = web.url_rows(cfg.web.rows, noise=cfg.web.noise, faults=cfg.web.fault_fraction > 0,
                                fault_fraction=cfg.web.fault_fraction)
            with tempfile.TemporaryDirectory() as tmp:
                local = web.write_url_list(Path(tmp, "urls.parquet"), rows)
                _upload(local, urls_uri)
            storage.write_bytes(fs, meta_path, json.dumps(
                {"base_url": web.base_url, "port": int(web.base_url.rsplit(":", 1)[1]), "rows": cfg.web.rows,
                 "seed": cfg.web.seed}).encode())
        print(f"[data] noisy web on {web.base_url}: {cfg.web.rows} URLs -> {urls_uri}",
              flush=True)
        yield urls_uri
    finally:
        web.stop()
