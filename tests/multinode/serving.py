"""``align-ray serve`` as its own process on the multi-node cluster
(the test process never joins Ray): one proxy on the head (every "node" of this box shares one
host, so only one proxy can hold the port)."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests
import yaml

from tests.conftest import REPO, free_port


def cli(args: list[str], cluster, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "align_ray.cli", *args], cwd=REPO,
                            env=cluster.env, stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True)


@contextmanager
def served(cluster, tmp_path: Path, model: str, index: str | None, cfg: dict) -> Iterator[str]:
    """``align-ray serve --config`` (``cfg`` plus HeadOnly proxy and a free port); yields the
    base URL once ``/healthz`` answers 200; SIGTERM (Serve shut down) on exit."""
    port = free_port()
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({**cfg, "proxy_location": "HeadOnly", "port": port}))
    log = tmp_path / "serve.log"
    args = ["serve", "--config", str(path), "--model", model, "--ray-address", cluster.address]
    proc = cli(args + (["--index", index] if index else []), cluster, log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not come up:\n" + log.read_text()[-3000:]
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def check_placement(cluster, app: str, names=("Router", "TextEncoder", "ImageEncoder")) -> None:
    """The app's replicas run on worker nodes only (the head has 0 CPUs, but a 0-CPU actor
    could still land there)."""
    for name in names:
        nodes = cluster.node_of_title(f"ServeReplica:{app}:{name}")
        assert nodes and all(n.type != "head" for n in nodes), (name, [n.name for n in nodes])
