"""Progress and a stall watchdog for the Ray Data stages (``data``, ``filter``, ``index``).

Ray Data draws progress bars on a terminal.  Off a terminal (CI, ``ray job submit`` logs, nohup)
it dumps a multi-line block per operator every few seconds; we replace that with one compact
line per ``status_interval_s``.  Either way, a stage that makes no progress for
``stall_timeout_s`` raises :class:`StageStalled`, whose message names every unfinished
operator, what it is waiting for (actors that cannot start, tasks that cannot be scheduled,
backpressure) and the cluster's free resources -- the classic case being an actor pool that
holds every CPU while the read task feeding it waits for one.  The CLI turns it into exit code 3.

Ray 2.60 has its own no-progress guard (``DataContext.execution_no_progress_timeout_s``); ours
adds the "waits for" diagnosis and the status line, and works the same on older Ray versions.
It reads Ray Data's executor state through a few internal attributes, each guarded, so a Ray
upgrade degrades the message rather than breaking the stage.
"""

from __future__ import annotations

import os
import sys
import time
from functools import lru_cache
from typing import Any

_KEY = "align_ray.watchdog"
DEFAULT_STALL_TIMEOUT_S = float(os.environ.get("ALIGN_RAY_STALL_TIMEOUT_S", 600))
DEFAULT_STATUS_INTERVAL_S = float(os.environ.get("ALIGN_RAY_STATUS_INTERVAL_S", 30))


class StageStalled(RuntimeError):
    """No operator of a stage made progress for ``stall_timeout_s``."""


def install(stage: str, stall_timeout_s: float | None = None,
            status_interval_s: float | None = None, tty: bool | None = None) -> None:
    """Watch every Dataset this process executes from now on (idempotent).

    ``stall_timeout_s`` <= 0 turns the watchdog off; ``tty`` None = ``sys.stderr.isatty()``.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    tty = sys.stderr.isatty() if tty is None else tty
    ctx.set_config(_KEY, dict(
        stage=stage,
        stall_timeout_s=DEFAULT_STALL_TIMEOUT_S if stall_timeout_s is None else float(stall_timeout_s),
        status_interval_s=(DEFAULT_STATUS_INTERVAL_S if status_interval_s is None
                           else float(status_interval_s)),
        status_lines=not tty))
    # Off a terminal our one-line status replaces Ray Data's per-operator log dump.
    ctx.enable_progress_bars = tty
    cls = callback_class()
    if cls not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(cls)


def _op_progress(op: Any, state: Any) -> tuple:
    metrics = getattr(op, "metrics", None)
    return (getattr(metrics, "num_outputs_taken", None),
            getattr(metrics, "num_tasks_finished", None),
            _safe(state.total_enqueued_input_blocks),
            _safe(state.total_enqueued_output_blocks))


def _safe(fn: Any, default: Any = None) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - internal API moved: leave that detail out
        return default


def _resources(res: Any) -> str:
    if res is None:
        return "?"
    parts = []
    for name in ("cpu", "gpu"):
        v = getattr(res, name, 0) or 0
        if v:
            parts.append(f"{v:g} {name.upper()}")
    return ", ".join(parts) or "no CPU/GPU"


def _need(op: Any) -> str:
    """Resources one more task / actor of ``op`` asks Ray for, custom resources included."""
    args = getattr(op, "_ray_remote_args", None) or {}
    if not args:
        return _resources(_safe(op.incremental_resource_usage))
    parts = [f"{args[k]:g} {name}" for k, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"))
             if args.get(k)]
    parts += [f"{v:g} {k}" for k, v in (args.get("resources") or {}).items()]
    return ", ".join(parts) or _resources(_safe(op.incremental_resource_usage))


def _cluster_free() -> str:
    import ray

    try:
        free, total = ray.available_resources(), ray.cluster_resources()
    except Exception:  # noqa: BLE001
        return "unknown"
    return ", ".join(f"{free.get(k, 0):g}/{total[k]:g} {k}" for k in ("CPU", "GPU") if k in total)


def diagnose(topology: dict) -> list[str]:
    """One line per unfinished operator: what it holds and what it waits for."""
    lines = []
    for op, state in topology.items():
        if _safe(op.has_completed, False) or type(op).__name__ == "InputDataBuffer":
            continue
        active = _safe(op.num_active_tasks, 0) or 0
        queued = _safe(state.total_enqueued_input_blocks, 0) or 0
        info = _safe(op.get_actor_info)
        pending = getattr(info, "pending", 0) or 0
        running = getattr(info, "running", 0) or 0
        need = _need(op)
        held = _resources(_safe(op.current_logical_usage))
        status = getattr(state, "_scheduling_status", None)
        parts = [f"{op.name}: {queued} queued input block(s), {active} running task(s)"]
        if running or pending:
            parts.append(f"{running} actor(s) up, {pending} waiting to start")
        parts.append(f"holds {held}")
        if pending:
            parts.append(f"WAITS FOR resources to start {pending} actor(s) ({need} each)")
        elif active:
            parts.append(f"WAITS FOR its {active} task(s) to be scheduled or finish "
                         f"(each needs {need})")
        elif queued and status is not None and not getattr(status, "under_resource_limits", True):
            parts.append(f"WAITS FOR Ray Data's resource budget (backpressured; a task needs {need})")
        elif queued:
            parts.append(f"WAITS FOR a free slot (a task needs {need})")
        else:
            parts.append("WAITS FOR input from the operator before it")
        lines.append("  - " + "; ".join(parts))
    return lines


@lru_cache(maxsize=None)
def callback_class() -> type:
    """:class:`StallWatchdog` as a subclass of Ray Data's ``ExecutionCallback`` (built on first
    use, so importing this module -- as the CLI does for :class:`StageStalled` -- stays cheap)."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    return type("StallWatchdogCallback", (StallWatchdog, ExecutionCallback),
                {"__module__": __name__})


def __getattr__(name: str) -> Any:
    # A DataContext holding the callback travels with a Dataset to other processes (Train's
    # split coordinator); pickle finds the class there by this module attribute.
    if name == "StallWatchdogCallback":
        return callback_class()
    raise AttributeError(name)


class StallWatchdog:
    """Ray Data execution callback body: status line + stall detection (see the module doc)."""

    def __init__(self) -> None:
        import ray.data

        cfg = ray.data.DataContext.get_current().get_config(_KEY, None) or {}
        self.stage = cfg.get("stage", "stage")
        self.timeout = float(cfg.get("stall_timeout_s", DEFAULT_STALL_TIMEOUT_S))
        self.interval = float(cfg.get("status_interval_s", DEFAULT_STATUS_INTERVAL_S))
        self.status_lines = bool(cfg.get("status_lines", False))
        self.start = self.last_change = self.last_status = time.monotonic()
        self.last_state: tuple | None = None

    def before_execution_starts(self, executor: Any) -> None:
        self.start = self.last_change = self.last_status = time.monotonic()

    def on_execution_step(self, executor: Any) -> None:
        topology = getattr(executor, "_topology", None)
        if not topology:
            return
        now = time.monotonic()
        state = tuple(_op_progress(op, s) for op, s in topology.items())
        if state != self.last_state:
            self.last_state, self.last_change = state, now
        if self.status_lines and now - self.last_status >= self.interval:
            self.last_status = now
            print(self.status_line(topology, now), file=sys.stderr, flush=True)
        if self.timeout > 0 and now - self.last_change >= self.timeout:
            raise StageStalled(
                f"align-ray {self.stage}: no progress for {now - self.last_change:.0f} s "
                f"(stall_timeout_s={self.timeout:g}); cluster free: {_cluster_free()}.\n"
                + "\n".join(diagnose(topology))
                + "\nGive the stage fewer/smaller actors (concurrency, num_cpus) or more "
                  "resources; raise stall_timeout_s if the work is legitimately this slow.")

    def status_line(self, topology: dict, now: float) -> str:
        parts = []
        for op in topology:
            if type(op).__name__ == "InputDataBuffer":
                continue
            done = getattr(op.metrics, "num_outputs_taken", 0)
            total = _safe(op.num_outputs_total)
            actors = getattr(_safe(op.get_actor_info), "running", 0)
            parts.append(f"{op.name} {done}/{total if total is not None else '?'}"
                         + (f" ({actors} actors)" if actors else ""))
        return f"[align-ray {self.stage}] {now - self.start:.0f} s: " + " | ".join(parts)
