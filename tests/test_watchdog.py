"""align_ray/watchdog.py: a Ray Data stage that cannot progress fails with a message naming the
stuck operator and what it waits for; off a terminal, progress comes as one-line statuses."""

from __future__ import annotations

import re
import time

import pytest

from align_ray import watchdog


@pytest.fixture
def fresh_context(ray_cluster):
    """Each test gets its own DataContext settings back afterwards."""
    import copy

    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = copy.copy(ctx.custom_execution_callback_classes), ctx.enable_progress_bars, \
        ctx.get_config(watchdog._KEY, None)
    yield ctx
    ctx.custom_execution_callback_classes[:] = saved[0]
    ctx.enable_progress_bars = saved[1]
    ctx.set_config(watchdog._KEY, saved[2])


def _double(batch):
    return {"id": batch["id"] * 2}


def test_a_stage_waiting_for_resources_fails_naming_the_operator(fresh_context):
    """A map whose tasks need a resource no node has can never run: without the watchdog this
    execution would wait for ever."""
    import ray.data

    watchdog.install("test", stall_timeout_s=8, status_interval_s=1, tty=False)
    ds = ray.data.from_items([{"id": i} for i in range(20)]).map_batches(
        _double, resources={"align_ray_no_such_resource": 1})
    t0 = time.monotonic()
    with pytest.raises(watchdog.StageStalled) as e:
        ds.take_all()
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert "align-ray test: no progress for" in msg
    stuck = [ln for ln in msg.splitlines() if "MapBatches(_double)" in ln]
    assert stuck and "WAITS FOR" in stuck[0] and "align_ray_no_such_resource" in stuck[0], msg
    assert "cluster free:" in msg and "CPU" in msg


def test_progress_lines_off_a_terminal_and_no_false_alarm(fresh_context, capfd):
    import ray.data

    watchdog.install("test", stall_timeout_s=30, status_interval_s=0.5, tty=False)
    assert fresh_context.enable_progress_bars is False  # our line replaces Ray's log dump

    def slow(batch):
        time.sleep(0.4)
        return batch

    out = ray.data.range(12, override_num_blocks=6).map_batches(slow).take_all()
    assert len(out) == 12
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[align-ray test]")]
    assert lines, err[-2000:]
    # per operator: blocks out / total (total known once planned)
    assert "MapBatches(slow)" in lines[-1] and re.search(r" \d+/(6|\?)", lines[-1]), lines


def test_off_switch(fresh_context):
    import ray.data

    watchdog.install("test", stall_timeout_s=0, tty=True)
    assert fresh_context.enable_progress_bars is True
    assert sorted(r["id"] for r in ray.data.range(4).map_batches(_double).take_all()) == [0, 2, 4, 6]


def test_installing_twice_registers_one_callback(fresh_context):
    watchdog.install("a", stall_timeout_s=5)
    watchdog.install("b", stall_timeout_s=5)
    cls = watchdog.callback_class()
    assert fresh_context.custom_execution_callback_classes.count(cls) == 1
    assert fresh_context.get_config(watchdog._KEY)["stage"] == "b"
