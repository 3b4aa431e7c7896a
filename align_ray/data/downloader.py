"""The Ray Data UDF: one shard at a time, read -> download -> decode/resize -> hash -> write.

A shard is the unit of work *and* of atomicity: its files are written, then its marker; a killed
run leaves at most unmarked shards, which the rerun redoes from scratch, so the final key set is
exactly that of an uninterrupted run.  Inside an actor, one asyncio loop (its own thread) runs
all downloads with connection reuse, ``threads`` at a time; decoding runs in a small thread pool
(OpenCV releases the GIL).  Blocks only ever carry shard specs and per-shard stats, and a shard
only ever holds re-encoded thumbnails, never raw bodies beyond the in-flight ones.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from align_ray.data import reader
from align_ray.data.config import DataConfig
from align_ray.data.errors import RETRYABLE, Drop
from align_ray.data.fetcher import Fetcher
from align_ray.data.hashing import sha256_hex, text_hash
from align_ray.data.politeness import Politeness
from align_ray.data.resizer import process_image
from align_ray.data.writer import Layout, ShardResult, read_marker, write_marker, write_part
from align_ray.layout import DROPPED_COLUMNS, SAMPLE_COLUMNS
from align_ray import storage


class ShardDownloader:
    """Callable class for ``Dataset.map_batches``: a batch holds work items of shard specs."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.layout = Layout(cfg.output)
        self.pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode")
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="fetch-loop", daemon=True).start()
        self.fetcher, self.slots, self.polite = self._run(self._open())

    async def _open(self) -> tuple[Fetcher, asyncio.Semaphore, Politeness]:
        fetcher = Fetcher(self.cfg)
        return fetcher, asyncio.Semaphore(self.cfg.threads), Politeness(self.cfg, fetcher)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __del__(self) -> None:
        try:  # close connections politely when Ray Data retires the actor
            asyncio.run_coroutine_threadsafe(self.fetcher.close(), self.loop).result(timeout=2)
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            return

    def __call__(self, batch: dict):
        """A batch holds work items; an item is a JSON list of shard specs (shard id, file
        index, row group, retry) run in order (pipeline.work_items).  Yields one row per shard
        as it is done."""
        for specs in batch["specs"]:
            for s, f, g, r in json.loads(str(specs)):
                info = self.process(str(s), int(f), int(g), bool(r))
                yield {"shard": [info["shard"]], "stats": [json.dumps(info)]}

    def process(self, shard: str, file_idx: int, row_group: int, retry: bool) -> dict:
        t0 = time.time()
        if retry:
            info = read_marker(self.layout, shard)
            rows, carry = self._retryable_rows(info)
            name = f"{shard}.r{info.get('retry_round', 0) + 1}"
        else:
            info, name, carry = None, shard, None
            rows = reader.read_shard_rows(self.layout, file_idx, row_group)
        result, num_bytes = self._run(self._download_all(rows, carry))
        parts = write_part(self.layout, name, result, write_parquet=self.cfg.write_parquet,
                           write_webdataset=self.cfg.write_webdataset)
        dropped = Counter(result.dropped["reason"])
        if info is None:
            info = {"shard": shard, "input_rows": rows.num_rows, "output_rows": 0, "parts": []}
        else:  # retry pass: the new dropped file (carried + still failing rows) replaces the old
            old_dropped = info["dropped_file"]
            info["retry_round"] = info.get("retry_round", 0) + 1
        info.update(output_rows=info["output_rows"] + len(result.samples["key"]),
                    parts=info["parts"] + parts, dropped=dict(dropped),
                    dropped_file=f"dropped/{name}.parquet",
                    retryable_dropped=sum(n for r, n in dropped.items() if r in RETRYABLE),
                    bytes_downloaded=info.get("bytes_downloaded", 0) + num_bytes,
                    seconds=round(time.time() - t0, 3))
        write_marker(self.layout, shard, info)
        if retry:
            storage.delete_quietly(self.layout.fs, self.layout.path(old_dropped))
        return info

    def _retryable_rows(self, info: dict) -> tuple[pa.Table, pa.Table]:
        """(rows to re-attempt, rows that stay dropped) of a finished shard."""
        table = pq.read_table(self.layout.path(info["dropped_file"]),
                                     filesystem=self.layout.fs)
        mask = pa.array([r in RETRYABLE for r in table.column("reason").to_pylist()], pa.bool_())
        retry = table.filter(mask).drop_columns(["reason", "detail", "retryable"])
        return retry, table.filter(pc.invert(mask))

    async def _download_all(self, rows: pa.Table,
                            carry: pa.Table | None) -> tuple[ShardResult, int]:
        loop = asyncio.get_running_loop()
        extra = [c for c in rows.column_names if c not in ("key", "url", "text")]
        records = rows.to_pylist()
        outcomes = await asyncio.gather(*(self._one(loop, r) for r in records))
        samples: dict[str, list] = {}
        dropped: dict[str, list] = {}
        num_bytes = 0
        for rec, out in zip(records, outcomes):
            if isinstance(out, Drop):
                row = {"key": rec["key"], "url": rec["url"], "text": rec["text"],
                       "reason": out.reason, "detail": out.detail[:500],
                       "retryable": out.reason in RETRYABLE}
                target = dropped
            else:
                row, target = out, samples
                num_bytes += out["num_bytes"]
            row.update({c: rec[c] for c in extra})
            for k, v in row.items():
                target.setdefault(k, []).append(v)
        if carry is not None:  # retry pass: non-retryable drops of the shard stay dropped
            for k, v in carry.to_pydict().items():
                dropped.setdefault(k, []).extend(v)
        types = {c: rows.schema.field(c).type for c in extra}
        return ShardResult(_fill(samples, SAMPLE_KEYS + extra), _fill(dropped, DROP_KEYS + extra),
                           types), num_bytes

    async def _one(self, loop: asyncio.AbstractEventLoop, rec: dict) -> dict | Drop:
        url = rec["url"]
        if not url or not url.strip():
            return Drop("missing_url", "empty or null url", retryable=False)
        ticket = None
        try:
            # opt-out lists, robots.txt and the host's gate come first, holding no download
            # slot: rows waiting for a busy or backing-off host do not slow the other hosts
            ticket = await self.polite.admit(url.strip())
            async with self.slots:
                try:
                    got = await self.fetcher.fetch(url.strip(), ticket)
                finally:
                    if ticket is not None:
                        ticket.leave()   # before decoding: the host's connection is done
                img, digest = await loop.run_in_executor(self.pool, _decode, got.body, self.cfg)
            self.polite.check_content(digest, img.phash)
        except Drop as d:
            return d
        except Exception as e:  # noqa: BLE001 - a bug must cost one row, not the run
            return Drop("internal_error", f"{type(e).__name__}: {e}", retryable=False)
        finally:
            if ticket is not None:
                ticket.leave()
        return {"key": rec["key"], "url": url, "text": rec["text"], "jpg": img.jpg,
                "width": img.width, "height": img.height, "original_width": img.original_width,
                "original_height": img.original_height, "format": img.format, "sha256": digest,
                "phash": img.phash, "text_hash": text_hash(rec["text"]),
                "final_url": got.final_url, "num_bytes": len(got.body)}


def _decode(body: bytes, cfg: DataConfig):
    return process_image(body, cfg), sha256_hex(body)


SAMPLE_KEYS = SAMPLE_COLUMNS   # the stage contract's column order (align_ray/layout.py)
DROP_KEYS = DROPPED_COLUMNS


def _fill(cols: dict[str, list], names: list[str]) -> dict[str, list]:
    """Columns in schema order, empty lists for a shard with no rows of that kind."""
    n = len(next(iter(cols.values()))) if cols else 0
    return {k: cols.get(k, [None] * n) for k in names}
