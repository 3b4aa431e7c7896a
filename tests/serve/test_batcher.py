"""NaturalBatcher: queries that arrive while a batch runs are searched together, in order."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from align_ray.serve.batcher import NaturalBatcher


def test_batches_form_while_busy_and_results_route_back():
    calls: list[list[int]] = []
    gate = threading.Event()

    def fn(items):
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)                    # hold the first batch while the rest arrive
        return [i * 10 for i in items]

    async def main():
        b = NaturalBatcher(fn, max_batch=4)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest), b

    first, rest, b = asyncio.run(main())
    assert first == 0 and rest == [10, 20, 30, 40, 50, 60]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]
    assert (b.batches, b.items) == (3, 7)


def test_errors_reach_every_caller_and_the_batcher_recovers():
    def fn(items):
        if "bad" in items:
            raise KeyError("bad")
        time.sleep(0.01)
        return items

    async def main():
        b = NaturalBatcher(fn)
        with pytest.raises(KeyError):
            await b.submit("bad")
        return await b.submit("good")

    assert asyncio.run(main()) == "good"


def _counting():
    """An async search that records each batch and the most batches ever out at once."""
    state = {"running": 0, "peak": 0, "calls": []}

    async def fn(items):
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        state["calls"].append(list(items))
        await asyncio.sleep(0.05)
        state["running"] -= 1
        return [i * 10 for i in items]

    return fn, state


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_at_most_in_flight_batches_run_at_once_and_a_deep_queue_uses_them_all(in_flight):
    """A sharded search may keep several batches out (so an added shard replica gets work): the
    cap holds, and a queue of many full batches uses every slot."""
    fn, state = _counting()

    async def main():
        b = NaturalBatcher(fn, max_batch=4, in_flight=in_flight)
        out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        # later, a lone query on an idle batcher is searched at once, alone
        return out, await b.submit(99), b

    out, lone, b = asyncio.run(main())
    calls = state["calls"]
    assert out == [i * 10 for i in range(20)] and lone == 990
    assert state["peak"] == in_flight
    assert sorted(i for c in calls for i in c) == list(range(20)) + [99]
    assert calls[-1] == [99] and all(len(c) <= 4 for c in calls)


def test_no_second_batch_while_one_batch_holds_the_queue():
    """Up to a full batch waiting, one batch goes out: one big batch reads the matrix once where
    two small ones would read it twice."""
    fn, state = _counting()

    async def main():
        b = NaturalBatcher(fn, max_batch=4, in_flight=3)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)               # its batch is out; 4 more queue behind it
        rest = asyncio.gather(*(b.submit(i) for i in range(1, 5)))
        return [await first, *await rest]

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert state["peak"] == 1 and state["calls"] == [[0], [1, 2, 3, 4]]


def test_in_flight_must_be_positive():
    with pytest.raises(ValueError, match="in_flight"):
        NaturalBatcher(lambda items: items, in_flight=0)
