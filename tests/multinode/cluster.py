"""A real multi-node Ray cluster on one machine: a head and worker raylets started with
``ray start``, each node its own process tree and its own ``--temp-dir``.

Node types come from ``clusters/aws.yaml``'s ``available_node_types`` with the same names and
a CPU-0 head, scaled down to this box: every worker type gets 1 CPU, a GPU type becomes a CPU
node that keeps its ``accelerator_type:*`` resource and gains ``GPU_sim`` (its GPU count), so
resource-shaped placement still has something to match; every node also carries a resource
named after its type (``{"gpu_train": 1}``), like the autoscaler's node-type labels.

Separate temp dirs also stand in for separate disks (session dirs, spilled objects, runtime
envs are per node).  Killing a node is what a crash does: SIGKILL to its raylet and to every
process of its tree at once; Ray then marks the node dead after missed health checks.  The
head is never killed (head loss is out of scope; see README "Running on a cluster").
Teardown kills exactly the processes this cluster started, found by process tree and temp
dir, never with ``ray stop``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE_BYTES = 150 * 1024 * 1024   # per node; the default 30% of RAM x 5 nodes is too much


def node_types(path: Path = REPO / "clusters" / "aws.yaml") -> dict[str, dict[str, float]]:
    """``{type name: ray start resources}`` scaled down from the cluster YAML (module doc)."""
    types = yaml.safe_load(path.read_text())["available_node_types"]
    head = yaml.safe_load(path.read_text())["head_node_type"]
    out = {}
    for name, spec in types.items():
        res = dict(spec.get("resources", {}))
        scaled: dict[str, float] = {"CPU": 0.0 if name == head else 1.0, name: 1.0}
        if res.get("GPU"):
            scaled["GPU_sim"] = float(res["GPU"])
        scaled.update({k: float(v) for k, v in res.items() if k.startswith("accelerator_type:")})
        out[name] = scaled
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    type: str
    temp_dir: Path
    raylet_pid: int = 0
    killed: bool = False
    env: dict[str, str] = field(default_factory=dict)   # the node's processes' environment
    # every process seen in this node's tree, pid -> start time (a pid the OS reused later
    # for someone else's process is never signalled)
    procs: dict[int, float] = field(default_factory=dict)


class LocalCluster:
    def __init__(self, root: Path | None = None, private_disks: bool = False) -> None:
        """``private_disks``: every node runs in its own mount namespace with its own tmpfs at
        ROOT/p, which holds its ``--temp-dir``, ``TMPDIR`` and ``HOME``.  A file one node writes
        there (its temp files, its job working directory, its caches) does not exist on any
        other node, as on separate machines; the rest of the host stays shared (the code, the
        venv)."""
        self.root = Path(root or tempfile.mkdtemp(prefix="mn-", dir="/tmp"))
        self.private_disks = private_disks
        self.types = node_types()
        self.nodes: list[Node] = []
        self.port = free_port()
        self.address = ""
        self.dashboard = ""
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": str(REPO),
                    # a job's entrypoint (`python ...`) resolves through the node's PATH
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                    # a SIGKILLed raylet refuses the GCS's health checks at once; checking every
                    # 1 s instead of 3 s marks it dead after ~5 s instead of ~16 s (measured)
                    "RAY_health_check_period_ms": "1000"}
        # Ray's default temp dir holds a ray_current_cluster file only if a start without
        # --temp-dir ran; we never do, and check so at teardown
        self._stale = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
        self._stale_before = self._stale.exists()

    # -- starting ---------------------------------------------------------------------------

    def _start(self, name: str, typ: str, args: list[str], retried: bool = False) -> Node:
        env = self.env
        if self.private_disks:   # short paths: Ray's unix socket paths must stay < 108 chars
            node = Node(name, typ, self.root / "p" / name)
            (self.root / "p").mkdir(exist_ok=True)
            env = {**self.env, "HOME": str(node.temp_dir / "home"),
                   "TMPDIR": str(node.temp_dir / "tmp")}
        else:
            node = Node(name, typ, self.root / name)
            node.temp_dir.mkdir(parents=True)
        res = {k: v for k, v in self.types[typ].items() if k != "CPU"}
        cmd = [RAY, "start", f"--temp-dir={node.temp_dir}", f"--num-cpus={self.types[typ]['CPU']:g}",
               "--num-gpus=0", f"--resources={_json(res)}",
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
               # every node on one host needs its own agent/metrics ports
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               *args]
        if self.private_disks:
            # `ray start` daemonises the node's processes inside this namespace; they keep it
            p, home = self.root / "p", node.temp_dir / "home"
            setup = (f"mount -t tmpfs -o size=4g,mode=1777 align-{name} {p} && "
                     f"mkdir -p {home} {node.temp_dir / 'tmp'} && "
                     f"printf 'provider:\\n  type: local\\n' > {home}/ray_bootstrap_config.yaml"
                     ' && exec "$@"')
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", *cmd]
        node.env = env
        self.nodes.append(node)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            failure = f"ray start for {name} failed:\n{proc.stdout}\n{proc.stderr}"
            if typ == "head" or retried:
                raise RuntimeError(failure)
            # `ray start` gives a raylet 30 s (fixed in Ray) to register; on a box loaded by a
            # second test process that was seen to run out once.  The half-started node is
            # killed like a crashed one and a fresh node of the same type takes its place.
            print(f"{failure.splitlines()[0]} ({failure.strip().splitlines()[-1][:200]}); "
                  "starting a new node instead", flush=True)
            self.kill(node)
            return self.add(typ, retried=True)
        node.raylet_pid = self._raylet_pid(node)
        node.procs.update(self._tree(node))
        return node

    def start_head(self, dashboard: bool = False) -> Node:
        """The CPU-0 head; ``dashboard``: with the job API on ``self.dashboard`` (for
        ``ray job submit``)."""
        args = ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}"]
        if dashboard:
            port = free_port()
            args += ["--include-dashboard=true", f"--dashboard-port={port}",
                     "--dashboard-host=127.0.0.1"]
            self.dashboard = f"http://127.0.0.1:{port}"
        else:
            args.append("--include-dashboard=false")
        head = self._start("head", "head", args)
        self.address = f"{_node_ip()}:{self.port}"
        return head

    def add(self, typ: str, retried: bool = False) -> Node:
        """Start one more worker node of ``typ`` (also the replacement for a lost one)."""
        n = sum(1 for x in self.nodes if x.type == typ) + 1
        return self._start(f"{typ}-{n}", typ, [f"--address={self.address}"], retried)

    def _raylet_pid(self, node: Node) -> int:
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in (p.info["name"] or "") and str(node.temp_dir) in cmd:
                return p.info["pid"]
        raise RuntimeError(f"no raylet found for {node.name}")

    def _tree(self, node: Node) -> dict[int, float]:
        """The node's live processes (pid -> start time): its raylet's descendants (workers
        retitle themselves, so their command lines no longer name the temp dir) and every
        process naming its temp dir."""
        procs: list[psutil.Process] = []
        try:
            if node.raylet_pid > 0:    # 0 while its `ray start` runs (pid 0's tree is everything)
                raylet = psutil.Process(node.raylet_pid)
                procs += [raylet, *raylet.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["pid", "cmdline"]):
            if any(str(node.temp_dir) in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        out = {}
        for p in procs:
            try:
                out[p.pid] = p.create_time()
            except psutil.Error:
                pass
        return out

    def on_node(self, node: Node, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """(command, environment) that run ``argv`` as a process of ``node``: inside its mount
        namespace when disks are private.  A Ray driver must run on a node: it talks to the
        raylet through sockets in that node's temp dir (the head's, for ``ray.init(address)``
        on a host with several nodes)."""
        if not self.private_disks:
            return argv, node.env
        return ["nsenter", f"--target={node.raylet_pid}", "--mount", *argv], node.env

    # -- finding and killing ----------------------------------------------------------------

    def node_of_pid(self, pid: int) -> Node:
        """The node whose process tree holds ``pid`` (a Ray worker, found via its raylet)."""
        for node in self.nodes:
            if not node.killed and pid in self._tree(node):
                return node
        raise LookupError(f"pid {pid} belongs to no live node of this cluster")

    def node_of_title(self, fragment: str) -> list[Node]:
        """Live nodes (head included) running a process whose title contains ``fragment``
        (e.g. ``MapWorker(MapBatches(ShardDownloader))``)."""
        found = []
        for node in self.nodes:
            if node.killed:
                continue
            for pid in self._tree(node):
                try:
                    title = " ".join(psutil.Process(pid).cmdline())
                except psutil.Error:
                    continue
                if fragment in title:
                    found.append(node)
                    break
        return found

    def count_title(self, fragment: str) -> int:
        """Live processes (all live nodes) whose title contains ``fragment``: e.g. the running
        replicas of a Serve deployment, ``ServeReplica:APP:NAME``."""
        n = 0
        for node in self.nodes:
            if node.killed:
                continue
            for pid in self._tree(node):
                try:
                    n += fragment in " ".join(psutil.Process(pid).cmdline())
                except psutil.Error:
                    pass
        return n

    def kill(self, node: Node) -> None:
        """Crash ``node``: SIGKILL its raylet and its whole process tree at once."""
        assert node.type != "head", "head-node loss is out of scope"
        procs = self._tree(node)
        node.procs.update(procs)
        for pid, started in procs.items():
            _sigkill(pid, started)
        node.killed = True

    def alive_nodes(self) -> int:
        """Nodes the GCS counts alive (``ray status``-free: a short Python subprocess)."""
        code = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', "
                "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env,
                             capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1])

    def wait_dead(self, expected_alive: int, timeout: float = 60) -> float:
        """Seconds until the GCS counts ``expected_alive`` nodes (a killed one marked dead)."""
        t0 = time.monotonic()
        while self.alive_nodes() != expected_alive:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"still not {expected_alive} alive nodes after {timeout} s")
            time.sleep(1)
        return time.monotonic() - t0

    # -- teardown ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill every process this cluster started (workers first, head last)."""
        for node in reversed(self.nodes):
            if not node.killed:
                node.procs.update(self._tree(node))
            for pid, started in node.procs.items():
                _sigkill(pid, started)
        if self._stale.exists() and not self._stale_before:
            self._stale.unlink()
            raise AssertionError(f"a Ray start wrote {self._stale}; every start must name "
                                 "its own --temp-dir")
        shutil.rmtree(self.root, ignore_errors=True)


def _sigkill(pid: int, started: float) -> None:
    try:
        if psutil.Process(pid).create_time() == started:
            os.kill(pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass


def _json(d: dict) -> str:
    import json

    return json.dumps(d)


def _node_ip() -> str:
    # Ray binds the GCS to the host's own address, not loopback, on this kind of machine
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()
