"""``align-ray data``: plan -> Ray Data over shards -> stats.json (resumable, exact)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import ray

from align_ray import storage, watchdog
from align_ray.data import reader
from align_ray.data.config import DataConfig
from align_ray.data.downloader import ShardDownloader
from align_ray.data.errors import InputError
from align_ray.layout import DROPPED, PARQUET, WEBDATASET, Layout

log = logging.getLogger("align_ray.data")


def _unwrap(e: Exception) -> Exception:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, InputError) else e


def ensure_plan(cfg: DataConfig, layout: Layout) -> dict:
    """Build (once) the keyed manifest of the input; reuse it when resuming."""
    files = reader.list_inputs(cfg.input)
    key = reader.plan_key(cfg, files)
    plan = reader.load_plan(layout)
    if plan is not None:
        if {k: plan[k] for k in key} != key:
            raise InputError(f"{cfg.output} already holds a run over another input or settings "
                             f"({ {k: plan[k] for k in key} }); use a new --output, or "
                             "--overwrite to start over")
        return plan
    groups = (cfg.host_groups or 4 * _actors(cfg)) if cfg.partition_by_host else 0
    build = ray.remote(num_cpus=1, max_retries=2)(reader.build_manifest)
    refs = [build.remote(cfg.input, f, i, cfg, reader.manifest_path(layout, i), groups)
            for i, f in enumerate(files)]
    try:
        entries = ray.get(refs)
    except Exception as e:  # noqa: BLE001 - re-raised, unwrapped from Ray's task error
        raise _unwrap(e) from None
    plan = {**key, "files": entries, "input_rows": sum(e["rows"] for e in entries),
            **({"host_groups": groups} if groups else {})}
    reader.save_plan(layout, plan)
    return plan


def _actors(cfg: DataConfig) -> int:
    return cfg.processes or max(1, int(ray.cluster_resources().get("CPU", 1)))


def work_items(plan: dict, markers: dict[str, dict], retry_failed: bool) -> list[dict]:
    """The Ray Data items of this run: each holds the shard specs one actor call runs, in
    order.  Unpartitioned, one shard per item.  Partitioned by host, one host group per item
    (its first-time shards and its retry passes alike), so a host is only ever talked to from
    the one actor that runs its group."""
    todo = [(grp, [s, f, g, False]) for s, f, g, grp in reader.shard_ids(plan)
            if s not in markers]
    if retry_failed:
        group_of = {s: grp for s, _, _, grp in reader.shard_ids(plan)}
        todo += [(group_of.get(s), [s, 0, 0, True]) for s, m in sorted(markers.items())
                 if m.get("retryable_dropped", 0) > 0]
    if "host_groups" not in plan:
        return [{"specs": json.dumps([spec])} for _, spec in todo]
    by_group: dict[int, list] = {}
    for grp, spec in todo:
        by_group.setdefault(grp, []).append(spec)
    return [{"specs": json.dumps(specs)} for _, specs in sorted(by_group.items())]


def _collect_garbage(layout: Layout, markers: dict[str, dict]) -> None:
    """Remove files of retry passes that died before their marker was written."""
    live = {p for m in markers.values() for p in m["parts"] + [m["dropped_file"]]}
    for sub in (PARQUET, WEBDATASET, DROPPED):
        folder = layout.path(sub)
        if not storage.exists(layout.fs, folder):
            continue
        for path in storage.list_files(layout.fs, folder):
            rel = f"{sub}/{path.rsplit('/', 1)[-1]}"
            shard = rel.split("/", 1)[1].split(".", 1)[0]
            if shard in markers and rel not in live:
                storage.delete_quietly(layout.fs, path)


def summarize(plan: dict, markers: dict[str, dict], seconds: float, cfg: DataConfig) -> dict:
    dropped: Counter = Counter()
    for m in markers.values():
        dropped.update(m["dropped"])
    total_shards = sum(f["shards"] for f in plan["files"])
    out_rows = sum(m["output_rows"] for m in markers.values())
    return {
        "input_rows": plan["input_rows"],
        "output_rows": out_rows,
        "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "complete": len(markers) == total_shards,
        "shards": total_shards,
        "bytes_downloaded": sum(m.get("bytes_downloaded", 0) for m in markers.values()),
        "seconds_this_run": round(seconds, 3),
        "config": {k: v for k, v in vars(cfg).items() if k not in ("input", "output")},
        "input": cfg.input,
    }


def run(cfg: DataConfig) -> dict:
    """Run (or resume) the download stage; returns the stats also written to stats.json."""
    t0 = time.time()
    watchdog.install("data", cfg.stall_timeout_s)
    layout = Layout(cfg.output)
    if cfg.overwrite:
        layout.clear()
    plan = ensure_plan(cfg, layout)
    markers = layout.markers()
    _collect_garbage(layout, markers)
    todo = work_items(plan, markers, cfg.retry_failed)
    rows_todo = 0
    if todo:
        workers = min(_actors(cfg), len(todo))
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        spa = max(1, cfg.shards_per_actor)
        # a fixed pool; each actor gets at most `spa` items at a time (so no actor hoards the
        # queue while another idles) and really runs them concurrently (threads; the work is
        # in asyncio, OpenCV and I/O, which release the GIL).  A call yields each shard's
        # stats as the shard finishes, so a host group's long call still shows progress.
        pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=spa,
                                          max_concurrent_calls_per_actor=spa,
                                          enable_true_multi_threading=True)
        out = ds.map_batches(ShardDownloader, fn_constructor_kwargs={"cfg": cfg}, batch_size=1,
                             compute=pool, num_cpus=1)
        for row in out.iter_rows():
            info = json.loads(row["stats"])
            markers[info["shard"]] = info
            rows_todo += info["input_rows"]
    seconds = time.time() - t0
    stats = summarize(plan, markers, seconds, cfg)
    stats["rows_per_s_this_run"] = round(rows_todo / seconds, 1) if seconds else 0.0
    layout.write_stats(stats)
    return stats


def summary_line(stats: dict) -> str:
    n, kept = stats["input_rows"], stats["output_rows"]
    top = ", ".join(f"{r} {c}" for r, c in list(stats["dropped"].items())[:6])
    more = "" if len(stats["dropped"]) <= 6 else ", ..."
    return (f"align-ray data: {kept}/{n} rows kept ({100 * kept / max(n, 1):.1f}%), "
            f"{n - kept} dropped [{top}{more}], {stats['rows_per_s_this_run']} rows/s, "
            f"{stats['seconds_this_run']:.1f}s, complete={stats['complete']}")
