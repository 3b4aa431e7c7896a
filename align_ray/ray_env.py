"""Starting or joining Ray the same way from the CLI, workflows and tests."""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
import tempfile
from pathlib import Path

import ray
from ray._private import ray_constants

_BOOTSTRAP = "provider:\n  type: local\n"


def sandbox_home(real_home: str) -> str:
    """A HOME holding ``ray_bootstrap_config.yaml`` with ``provider: {type: local}``, and a
    symlink to every entry of ``real_home`` (so ~/.aws, ~/.cache, ... still resolve).

    When Ray starts a local cluster, its dashboard looks for that file in HOME and, without it,
    sends HTTP probes to cloud metadata endpoints (169.254.169.254, metadata.google.internal)
    to guess the cloud for usage stats.  A local cluster is local, so we say so.
    """
    tag = hashlib.sha1(real_home.encode()).hexdigest()[:8]
    sandbox = Path(tempfile.gettempdir(), f"align-ray-home-{os.getuid()}-{tag}")
    sandbox.mkdir(exist_ok=True)
    (sandbox / "ray_bootstrap_config.yaml").write_text(_BOOTSTRAP)
    if real_home and Path(real_home).is_dir() and Path(real_home) != sandbox:
        for entry in Path(real_home).iterdir():
            link = sandbox / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    return str(sandbox)


def starts_local(address: str | None) -> bool:
    """Whether ``ray.init(address)`` here starts a new local cluster instead of joining one."""
    return address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))


def init(address: str | None = None, **kwargs) -> None:
    """Join/start Ray unless already initialised.

    ``address=None`` is plain ``ray.init()``: under ``ray job submit`` or with RAY_ADDRESS it
    joins that cluster, otherwise it starts a local one.  ``"local"`` always starts a fresh
    local cluster (never follows a stale ``ray_current_cluster`` file).  A local start gets
    :func:`sandbox_home` as the HOME of the Ray processes it launches.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs.setdefault("logging_level", "WARNING")
    real = os.environ.get("HOME", "")
    if starts_local(address) and not Path(real or "/nonexistent", "ray_bootstrap_config.yaml").exists():
        os.environ["HOME"] = sandbox_home(real)
    try:
        ray.init(address=address, **kwargs)
    finally:
        if real:
            os.environ["HOME"] = real


def read_parquet(paths, **kwargs) -> "ray.data.Dataset":
    """``ray.data.read_parquet`` through Ray Data's V1 Parquet datasource (one read task per
    file fragment, planned on the driver), unless ``RAY_DATA_USE_DATASOURCE_V2`` is set.

    Why: Ray 2.60's default V2 datasource plans every read as ListFiles -> ReadFiles, and its
    ListFiles task spends about two seconds of wall time with almost no CPU (Ray Data's own
    per-operator stats), on every read, however small.  Our stages read parquet several times
    each (the tokenizer pass, validation, index, filter, semdedup), so that latency is a large
    part of a short command and of the test suite.  BENCHMARKS.md "Parquet reads: Ray Data's
    V1 and V2 datasources" has the measurement.  Both read the same rows; V1 keeps file
    order under ``preserve_order``; V2's extras (``ignore_missing_paths``, ``skip_paths``) are
    not used here.
    """
    import ray.data

    if "RAY_DATA_USE_DATASOURCE_V2" in os.environ:   # the user's explicit choice
        return ray.data.read_parquet(paths, **kwargs)
    ctx = ray.data.DataContext.get_current()
    was, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:   # read_parquet picks the datasource when it builds the plan
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = was


def started_here() -> bool:
    """True when this process started the Ray cluster it is connected to (a local start), so
    that shutting down ends the cluster rather than only disconnecting from it."""
    node = getattr(ray._private.worker, "_global_node", None)
    return ray.is_initialized() and node is not None and node.is_head()


def init_for_command(address: str | None = None, **kwargs) -> None:
    """:func:`init` for a one-shot command such as ``align-ray data``: a cluster this call
    starts lives exactly as long as the command, so it is started lean and ended fast.

    * No dashboard (``include_dashboard=False``, unless given): Ray's dashboard process then
      loads only its usage-stats module, with no web frontend and no module subprocesses,
      CPU time the command would otherwise share with its own work on a small machine.
    * At exit, :func:`shutdown_fast` runs instead of Ray's own exit hook, and the interpreter's
      final garbage collections skip the objects alive by then (``gc.freeze()``): with Ray,
      pyarrow and OpenCV loaded, those collections are most of the time a finished command
      takes to exit.  Objects are still released by reference counting (files flush and
      close as usual); only cyclic garbage left at exit is not collected before the OS takes
      the memory back.

    Joining a running cluster (``RAY_ADDRESS``, ``ray job submit``, an address) is the same as
    :func:`init`: Ray ignores ``include_dashboard`` then, and the cluster is left running.
    """
    kwargs.setdefault("include_dashboard", False)
    init(address, **kwargs)
    if started_here():
        atexit.register(_end_of_command)  # runs before Ray's own hook (atexit is LIFO)


def _end_of_command() -> None:
    shutdown_fast()
    gc.freeze()


def shutdown_fast() -> None:
    """``ray.shutdown()`` without the waits a finished command does not need.

    At interpreter exit Ray's hook sleeps 0.5 s (for worker log lines still in flight), then
    stops each of the cluster's processes in turn, SIGTERM and up to 1 s for each to go; the
    autoscaler monitor of a local cluster does not exit within that second, so it always
    costs all of it.  Here the monitor and the dashboard (no state the command needs) are
    SIGKILLed first, then ``ray.shutdown()`` disconnects the driver and stops the raylet
    (which stops the workers), the GCS and the log monitor as usual.  Clusters this process
    did not start are only disconnected from, as with ``ray.shutdown()``.
    """
    if not ray.is_initialized():
        return
    if started_here():
        node = ray._private.worker._global_node
        for kind in (ray_constants.PROCESS_TYPE_MONITOR, ray_constants.PROCESS_TYPE_DASHBOARD):
            for info in node.all_processes.get(kind, []):
                if info.process.poll() is None:
                    info.process.kill()
    ray.shutdown()
