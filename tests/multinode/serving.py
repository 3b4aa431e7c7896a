"""``align-ray serve`` as its own process on the multi-node cluster
(the test process never joins Ray): one proxy on the head (every "node" of this box shares one
host, so only one proxy can hold the port); closed-loop HTTP load and its per-phase figures
(tests/multinode/test_serve.py, benchmarks/router_node_loss.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
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


CLIENTS = 8


class Load:
    """``clients`` closed-loop HTTP clients posting ``body(n)``; each answer recorded as (start,
    end, status, ok, detail, replays), ``ok`` from ``check(request number, response json)``
    for a 200; anything else is ok only as a 503 with a detail and ``Retry-After``; a
    connection error or timeout (status None) never is.  ``session``: each client's ``requests`` session (plain by
    default: every failure counts; ``align_ray.client.retrying_session`` for AlignClient's)."""

    def __init__(self, url: str, body, check, clients: int = CLIENTS,
                 session=requests.Session) -> None:
        self.url, self.body, self.check, self.session = url, body, check, session
        self.results: list[tuple] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        with self.session() as s:
            n = 0
            while not self.stop_event.is_set():
                body = self.body(i + n)
                t0 = time.monotonic()
                try:
                    r = s.post(self.url, json=body, timeout=60)
                except requests.RequestException as e:      # lost or hung: never allowed
                    self.results.append((t0, time.monotonic(), None, False, repr(e)[:200], 0))
                    continue
                if r.status_code == 200:
                    ok, detail = self.check(i + n, r.json()), ""
                else:   # a load balancer's own error page is not JSON
                    try:
                        detail = r.json().get("detail", "")
                    except ValueError:
                        detail = r.text[:200]
                    ok = (r.status_code == 503 and bool(detail)
                          and r.headers.get("Retry-After") is not None)
                # how often a retrying session replayed this request (urllib3's record)
                retries = getattr(r.raw, "retries", None)
                replays = len(retries.history) if retries is not None else 0
                self.results.append((t0, time.monotonic(), r.status_code, ok, detail, replays))
                n += 1

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=90)
        assert not any(t.is_alive() for t in self.threads), "a client hung"


def phase(results: list[tuple], lo: float, hi: float) -> dict:
    """Requests started in [lo, hi): count, rate, p50/p99 latency, statuses, failures."""
    sel = [r for r in results if lo <= r[0] < hi]
    if not sel:
        return {}
    lat = np.array([r[1] - r[0] for r in sel]) * 1000
    return {"requests": len(sel), "req_per_s": round(len(sel) / (hi - lo), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "status": {str(c): sum(r[2] == c for r in sel) for c in {r[2] for r in sel}},
            "not_ok": sum(not r[3] for r in sel), "replayed": sum(r[5] > 0 for r in sel)}
