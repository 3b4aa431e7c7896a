"""Natural batching for the Router's index searches.

While one batch is being searched (in a worker thread, so the Router keeps serving HTTP), new
queries queue up; the next batch takes all of them (up to ``max_batch``) in one call.  No timer:
an idle server searches a lone query at once, a busy one reads the embedding matrix once per
batch instead of once per query (the scan is memory-bound, so this is most of the cost at 1M rows).

Up to ``in_flight`` batches may run at once (default 1), but a further one goes out only when
more than ``max_batch`` queries wait per batch already out: below that, one big batch reads the
matrix once, where two smaller ones on the same replica read it twice (BENCHMARKS.md, "The
Router's batches in flight per sharded index", has what that cost).  A search in the Router's own
threads keeps 1.  A sharded search allows more: past that queue, an ``IndexShard`` replica added
by the autoscaler gets work, and Serve sees the queue (ongoing requests above one) that adds it.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable


class NaturalBatcher:
    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 32,
                 in_flight: int = 1):
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.fn = fn
        self.max_batch, self.in_flight = max_batch, in_flight
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._tasks = {t for t in self._tasks if not t.done()}
        live = len(self._tasks)
        # a busy drain takes what queued when its batch returns; another starts only when that
        # would still leave a full batch waiting
        if live == 0 or (live < self.in_flight and len(self._pending) > self.max_batch * live):
            self._tasks.add(asyncio.create_task(self._drain()))
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[:self.max_batch]
            del self._pending[:self.max_batch]
            batch = [(item, f) for item, f in batch if not f.done()]   # skip cancelled requests
            if not batch:
                continue
            try:
                items = [item for item, _ in batch]
                # a sharded index's search is itself async (calls to the shard deployments)
                results = await (self.fn(items) if inspect.iscoroutinefunction(self.fn)
                                 else asyncio.to_thread(self.fn, items))
            except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, f), result in zip(batch, results):
                if not f.done():
                    f.set_result(result)
