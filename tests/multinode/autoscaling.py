"""An autoscaling Ray cluster on one machine: Ray's real autoscaler with its fake multi-node
provider, which launches and terminates real raylets on this host.

``ray.cluster_utils.AutoscalingCluster`` does the same, but its ``start()`` and ``shutdown()``
run a machine-wide ``ray stop --force``, which would kill every other Ray on a shared box (and
its generated config names the head type ``ray.head.default`` only).  This starts the same
thing itself: ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=CONFIG``, with its own
GCS port and temp dir.  The head's monitor process then runs the autoscaler, and the provider
starts each worker node as a raylet process tree of the monitor.  Those nodes use the head's
temp dir (the provider gives them none), so every process of this cluster names ROOT, and
teardown kills exactly those, never with ``ray stop``.

The node types are ``clusters/aws.yaml``'s, scaled down as in tests/multinode/cluster.py
(``node_types``), with the YAML's ``min_workers`` (0), small ``max_workers``, and a short
``idle_timeout_minutes``.  Two differences from that fixed cluster, so that the autoscaler's
own placement rules are what is tested: a type the YAML gives CPU 0 (the A100 type) keeps CPU 0,
and a GPU type advertises one logical ``GPU`` (Ray schedules logical resources; nothing here
asks for a GPU, so no code ever looks for the hardware).  Ray's autoscaler keeps CPU-only work
off node types that have GPUs while a CPU type can take it.  The provider fixes the head's type
name to ``ray.head.default``; its resources are the YAML head's (CPU 0).

By hand, the same cluster (the GCS listens on the host's address, which ``write_config``
prints as HOST; stop it afterwards with ``pkill -9 -f /tmp/as/``, which kills only its
processes, not with ``ray stop``)::

    python -c "from tests.multinode.autoscaling import write_config; write_config('/tmp/as')"
    RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1 ray start --head --port 6390 \\
        --num-cpus 0 --resources '{"head": 1}' --temp-dir /tmp/as/t \\
        --autoscaling-config /tmp/as/autoscaling.yaml
    echo 'data: {processes: 2}' > /tmp/as/run.yaml
    RAY_ADDRESS=HOST:6390 python workflows/end_to_end.py --smoke --stages data,filter \\
        --config /tmp/as/run.yaml --output /tmp/as/run
    ray status --address HOST:6390     # nodes added for the stages, removed when idle
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from tests.multinode.cluster import OBJECT_STORE_BYTES, REPO, RAY, _node_ip, free_port, node_types

HEAD_TYPE = "ray.head.default"   # fixed by the fake provider (FAKE_HEAD_NODE_TYPE)
MAX_WORKERS = {"cpu_worker": 3, "gpu_train": 2, "gpu_serve": 1}


def config(gcs_address: str, idle_timeout_s: float) -> dict:
    """The autoscaler config: aws.yaml's worker types scaled down, the fake provider."""
    aws = yaml.safe_load((REPO / "clusters" / "aws.yaml").read_text())
    scaled = node_types()
    types: dict[str, dict] = {}
    for name, spec in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            types[HEAD_TYPE] = {"resources": scaled[name], "node_config": {}, "max_workers": 0}
            continue
        yaml_res = spec.get("resources", {})
        res = {k: v for k, v in scaled[name].items() if k != "GPU_sim"}
        if yaml_res.get("CPU", 1) == 0:      # the A100 type: no CPU, so no CPU work starts one
            res["CPU"] = 0.0
        if yaml_res.get("GPU"):              # a logical GPU: the autoscaler's GPU rules apply
            res["GPU"] = 1.0
        res["object_store_memory"] = OBJECT_STORE_BYTES
        types[name] = {"resources": res, "node_config": {},
                       "min_workers": spec.get("min_workers", 0),
                       "max_workers": min(spec.get("max_workers", 1), MAX_WORKERS.get(name, 1))}
    return {
        "cluster_name": "align-ray-fake", "max_workers": sum(MAX_WORKERS.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": types, "head_node_type": HEAD_TYPE,
        "upscaling_speed": aws.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def write_config(root: str | Path, port: int = 6390, idle_timeout_s: float = 15) -> Path:
    """ROOT/autoscaling.yaml for a head on ``port`` of this host (see the module doc)."""
    path = Path(root) / "autoscaling.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config(f"{_node_ip()}:{port}", idle_timeout_s)))
    print(f"wrote {path}; the head's address will be {_node_ip()}:{port}")
    return path


class AutoscalingLocalCluster:
    def __init__(self, idle_timeout_s: float = 15) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
        self.port = free_port()
        self.address = f"{_node_ip()}:{self.port}"
        self.idle_timeout_s = idle_timeout_s
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": str(REPO), "RAY_ADDRESS": self.address,
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                    # the monitor's provider starts nodes in-process; keep its files under ROOT
                    "TMPDIR": str(self.root / "tmp"),
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_health_check_period_ms": "1000"}
        self.head_pid = 0
        self._stale = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
        self._stale_before = self._stale.exists()

    def start(self) -> None:
        (self.root / "tmp").mkdir(parents=True)
        cfg = self.root / "autoscaling.yaml"
        cfg.write_text(yaml.safe_dump(config(self.address, self.idle_timeout_s)))
        head = node_types()["head"]
        cmd = [RAY, "start", "--head", f"--port={self.port}", f"--temp-dir={self.root / 't'}",
               f"--autoscaling-config={cfg}", f"--num-cpus={head['CPU']:g}", "--num-gpus=0",
               f"--resources={json.dumps({k: v for k, v in head.items() if k != 'CPU'})}",
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
               "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{proc.stdout}\n{proc.stderr}")

    def nodes(self) -> list[dict]:
        """Alive nodes from the GCS: ``{"type", "CPU", "id"}`` (type from the node's
        type-named resource, as the scaled types carry; the head's is ``head``)."""
        code = ("import ray,sys,json; ray.init(address=sys.argv[1], logging_level='ERROR', "
                "log_to_driver=False); print(json.dumps([n['Resources'] | {'id': n['NodeID']} "
                "for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        names = set(node_types())
        return [{"type": next((k for k in r if k in names), "?"), "CPU": r.get("CPU", 0),
                 "id": r["id"]} for r in json.loads(out.stdout.strip().splitlines()[-1])]

    def wait_nodes(self, pred, timeout: float, what: str) -> tuple[float, list[dict]]:
        t0 = time.monotonic()
        while True:
            now = self.nodes()
            if pred(now):
                return time.monotonic() - t0, now
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what}: not within {timeout} s; nodes now {now}")
            time.sleep(1)

    def _procs(self) -> dict[int, float]:
        """Every process of this cluster: the head's tree (its monitor starts the workers'
        raylets) and every process naming ROOT (workers retitle themselves)."""
        found: list[psutil.Process] = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(str(self.root) in a for a in (p.info["cmdline"] or [])):
                found.append(p)
                try:
                    found += p.children(recursive=True)
                except psutil.Error:
                    pass
        out = {}
        for p in found:
            try:
                out[p.pid] = p.create_time()
            except psutil.Error:
                pass
        return out

    def shutdown(self) -> None:
        for _ in range(2):   # a monitor may launch a node while we kill
            for pid, started in self._procs().items():
                try:
                    if psutil.Process(pid).create_time() == started:
                        os.kill(pid, signal.SIGKILL)
                except (psutil.Error, ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.5)
        if self._stale.exists() and not self._stale_before:
            self._stale.unlink()
            raise AssertionError(f"a Ray start wrote {self._stale}")
        shutil.rmtree(self.root, ignore_errors=True)
