"""Losing the node of a Router replica under load, through either HTTP ingress, on a real
multi-node cluster (README "HTTP ingress"; tests/multinode/test_serve.py kills an encoder's node,
never a Router's).  ``--ingress haproxy`` runs the cluster as the README tells its users:
``RAY_SERVE_ENABLE_HA_PROXY=1`` in the environment of every node's ``ray start`` and of the
driver, then ``align-ray serve --ingress haproxy --ray-address ADDR``; ``--ingress proxy`` is
the same run through Serve's Python proxy, for comparison.

The cluster is tests/multinode/cluster.py's (a CPU-0 head and worker raylets started with
``ray start`` on this box, node types from clusters/aws.yaml).  Two Router replicas, both
encoders at one replica each; the ingress (HAProxy, or the proxy actor) on the head only.
The script checks and reports:

1. where everything runs: HAProxy on the head, every replica on a worker node;
2. under ``--clients`` closed-loop clients posting texts to ``/v1/embed/text`` for
   ``--seconds``: every answer a 200 carrying the embeddings a local ``Embedder`` gives the
   same texts, the request rate and p50/p99, and (HAProxy) how it spread the requests over
   the Router replicas (its admin socket's ``show stat``);
3. the node of one Router replica (not the TextEncoder's) SIGKILLed under that load, which
   stays on for ``--after-s`` more: every request answered (no connection error or client
   timeout; a refusal must be a 503 with a detail), each failure's time relative to the kill,
   the seconds until 5 s of clean answers, the rate and latency after the kill.
   ``--retry-on`` is HAProxy's replay policy (serve/ingress.py says why ours replays a request
   the dying Router never answered).  ``--client-retries N``: each client replays a failed
   request as ``AlignClient`` does (``align_ray/client.py``), the remedy for the proxy
   ingress, which does not replay.

    .venv/bin/python benchmarks/router_node_loss.py --ingress haproxy --json OUT.json

Exit status 1 if any check fails (the JSON says which).  Not part of CI (its cluster half is
already the longer one); BENCHMARKS.md "Losing a Router's node" has the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from align_ray.client import retrying_session  # noqa: E402
from align_ray.serve.ingress import (_HAPROXY_PATHS, HAPROXY_FLAG, RETRY_ON,  # noqa: E402
                                     RETRY_ON_FLAG)
from tests.multinode.cluster import LocalCluster  # noqa: E402
from tests.multinode.serving import Load, check_placement, phase, served  # noqa: E402

APP = "align"
TEXTS = [f"a picture of thing number {i}" for i in range(32)]


def tiny_model(out: Path) -> str:
    """A random-init tiny dual encoder saved as ours (the serving path does not care that it is
    untrained; the answers are checked against the same weights run locally)."""
    import torch

    from align_ray.model import DualEncoder, ModelConfig, save_pretrained, train_wordpiece

    torch.manual_seed(0)
    cfg = ModelConfig.tiny(vocab_size=500)
    tok = train_wordpiece(TEXTS * 4, vocab_size=cfg.vocab_size, max_length=cfg.max_length)
    save_pretrained(DualEncoder(cfg, len(tok)).eval(), tok, cfg, out)
    return str(out)


def haproxy_stat(sock: str) -> list[dict]:
    """HAProxy's ``show stat`` over its admin socket: one dict per frontend/backend/server row."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().strip().splitlines()
    head = lines[0].lstrip("# ").split(",")
    return [dict(zip(head, line.split(","))) for line in lines[1:] if line]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--recover-s", type=float, default=90.0)
    ap.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                    help="proxy: the same run through Serve's Python proxy, for comparison")
    ap.add_argument("--retry-on", default=RETRY_ON,
                    help="HAProxy's retry-on, RAY_SERVE_HAPROXY_RETRY_ON (default: the README's "
                         "setting, serve/ingress.py; 'conn-failure' is Ray's own default)")
    ap.add_argument("--after-s", type=float, default=15.0,
                    help="load kept on at least this long after the kill")
    ap.add_argument("--client-retries", type=int, default=0,
                    help="each client replays a failed request this many times, as AlignClient "
                         "does (align_ray/client.py); 0: every failure counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="haproxy-mn-"))
    cluster = LocalCluster()
    # what README "HTTP ingress" tells a cluster user to set on every node and the driver (the
    # HAProxy file paths too: on this box every node shares /tmp; a short folder, as
    # serve/ingress.py requires of socket paths)
    run = Path(tempfile.mkdtemp(prefix="hx-", dir="/tmp"))
    if args.ingress == "haproxy":
        cluster.env.update({name: str(run / leaf) for name, leaf in _HAPROXY_PATHS.items()})
        cluster.env.update({HAPROXY_FLAG: "1", RETRY_ON_FLAG: args.retry_on})
    else:
        cluster.env.pop(HAPROXY_FLAG, None)
    report: dict = {"ingress": args.ingress, "checks": {}, "client_retries": args.client_retries,
                    "retry_on": args.retry_on if args.ingress == "haproxy" else None}
    checks = report["checks"]
    try:
        cluster.start_head()
        for typ in ("cpu_worker", "gpu_train", "gpu_train"):
            cluster.add(typ)
        model = tiny_model(root / "model")
        from align_ray.model import Embedder

        emb = Embedder.load(model)
        want = dict(zip(TEXTS, np.asarray(emb.embed_texts(TEXTS))))
        cfg = {"ingress": args.ingress, "router": {"num_replicas": 2, "num_cpus": 0.05,
                                                "call_timeout_s": 10},
               "image_encoder": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.05},
               "text_encoder": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.05}}
        with served(cluster, root, model, None, cfg) as base:
            check_placement(cluster, APP)
            if args.ingress == "haproxy":
                hosts = cluster.node_of_title("haproxy")
                report["haproxy_nodes"] = [n.name for n in hosts]
                checks["haproxy on the head only"] = [n.type for n in hosts] == ["head"]
            routers = cluster.node_of_title(f"ServeReplica:{APP}:Router")
            encoders = {n.name for n in cluster.node_of_title(f"ServeReplica:{APP}:TextEncoder")}
            report["router_nodes"] = [n.name for n in routers]
            report["text_encoder_nodes"] = sorted(encoders)

            # Serve puts each node's HAProxy files in a folder named after the node id
            admin = next((str(p) for p in run.glob("*/admin.sock")), None)
            before = ({r["svname"]: int(r["stot"]) for r in haproxy_stat(admin)}
                      if admin else {})

            def body(n: int) -> dict:
                return {"texts": [TEXTS[(n + j) % len(TEXTS)] for j in range(8)]}

            def check(n: int, js: dict) -> bool:
                want_n = np.stack([want[t] for t in body(n)["texts"]])
                return bool(np.abs(np.asarray(js["embeddings"]) - want_n).max() < 1e-4)

            load = Load(f"{base}/v1/embed/text", body, check, clients=args.clients,
                        session=partial(retrying_session, args.client_retries))
            t0 = time.monotonic()
            try:
                time.sleep(args.seconds)
                t_kill = time.monotonic()
                if admin:
                    report["haproxy_servers"] = {
                        r["pxname"] + "/" + r["svname"]: int(r["stot"]) - before.get(r["svname"], 0)
                        for r in haproxy_stat(admin) if r["svname"] not in ("FRONTEND", "BACKEND")}
                victims = [n for n in routers if n.name not in encoders]
                report["victim"] = victims[0].name if victims else None
                recovered = None
                if victims:
                    cluster.kill(victims[0])
                    while time.monotonic() - t_kill < args.recover_s:
                        time.sleep(1)
                        bad = [r for r in load.results if r[2] != 200 and r[0] >= t_kill - 5]
                        last_bad = max((r[1] for r in bad), default=t_kill)
                        if recovered is None and time.monotonic() - last_bad > 5 and any(
                                r[2] == 200 and r[0] > last_bad for r in load.results):
                            recovered = round(last_bad - t_kill, 1)
                        if recovered is not None and time.monotonic() - t_kill > args.after_s:
                            break
            finally:
                load.stop()
            t_end = time.monotonic()
            res = load.results
            report["before_kill"] = phase(res, t0, t_kill)
            report["after_kill"] = phase(res, t_kill, t_end)
            report["recovered_s"] = recovered
            # every failed answer: (started, ended) in s after the kill, status, detail
            report["failures"] = [(round(r[0] - t_kill, 2), round(r[1] - t_kill, 2), r[2], r[4])
                                  for r in res if not r[3]][:20]
            # requests a retrying client replayed: (started, ended) after the kill, replays
            report["replayed"] = [(round(r[0] - t_kill, 2), round(r[1] - t_kill, 2), r[5])
                                  for r in res if r[5]][:20]
            if admin:
                checks["both Router replicas served"] = (
                    sum(v > 0 for v in report["haproxy_servers"].values()) >= 2)
            checks["every answer before the kill a correct 200"] = (
                report["before_kill"]["not_ok"] == 0 and report["before_kill"]["requests"] > 0)
            checks["no connection error or timeout"] = all(r[2] is not None for r in res)
            checks["every refusal a 503 with a detail"] = all(r[3] for r in res)
            checks["whole again"] = recovered is not None
    finally:
        cluster.shutdown()
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    report["ok"] = all(checks.values())
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
