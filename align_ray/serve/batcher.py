"""Natural batching for the Router's index searches.

While one batch is being searched (in a worker thread, so the Router keeps serving HTTP), new
queries queue up; the next batch takes all of them (up to ``max_batch``) in one call.  No timer:
an idle server searches a lone query at once, a busy one reads the embedding matrix once per
batch instead of once per query (the scan is memory-bound, so this is most of the cost at 1M rows).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable


class NaturalBatcher:
    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 32):
        self.fn = fn
        self.max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
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
