"""Input URL lists -> a keyed manifest the download shards read from.

Inputs: parquet, csv, tsv or jsonl (optionally compressed: .gz/.bz2/.zst), given as a file, a
folder or a glob, local or ``s3://``.  Files are taken in sorted order; row ``r`` of file ``f``
gets the key ``f"{f:05d}{r:09d}"``, so a rerun over the same input produces the same keys.

Each input file is copied once (one Ray task per file) into ``_manifest/FFFFF.parquet`` holding
only key, url, text and the extra columns, in row groups of ``shard_size`` rows: row group ``g``
of file ``f`` is shard ``FFFFF_GGGGG``.  Shards then read their rows in O(shard) from any node.

With ``partition_by_host`` the rows of a file are first stably ordered by their *host group*
(a hash of the URL's host, modulo the plan's ``host_groups``) and each row group holds the rows
of one host group only; the plan records each shard's group, and the stage runs all shards of
a group in one actor call.  Keys still come from the input row number, so the key set (and
every row's key) is the same as without partitioning.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
from yarl import URL

from align_ray import storage
from align_ray.data.blocklist import normalize_host
from align_ray.data.config import DataConfig
from align_ray.data.errors import InputError
from align_ray.layout import Layout

_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
            ".json": "jsonl", ".ndjson": "jsonl"}


def input_format(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    fmt = _FORMATS.get(posixpath.splitext(name)[1])
    if fmt is None:
        raise InputError(f"{path}: unknown input format; expected one of "
                         f"{sorted(_FORMATS)} (optionally {'/'.join(_COMPRESSED)})")
    return fmt


def list_inputs(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    files = storage.list_files(fs, path)
    if not files:
        raise InputError(f"no input files found at {uri!r}")
    for f in files:
        input_format(f)
    return files


def _read_table(uri_of_fs: str, path: str, head_only: bool = False) -> pa.Table:
    fs, _ = storage.filesystem(uri_of_fs)
    fmt = input_format(path)
    try:
        if fmt == "parquet":
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(path, compression="detect") as f:
            raw = f.read(1 << 16) if head_only else f.read()
        if head_only and len(raw) == 1 << 16:  # keep whole lines only
            raw = raw[: raw.rfind(b"\n") + 1] or raw
        if not raw.strip():
            raise InputError(f"{path}: the file is empty")
        raw.decode("utf-8")  # a clear error instead of pyarrow's per-column message
        if fmt == "jsonl":
            return pjson.read_json(io.BytesIO(raw))
        # quoted fields are honoured in TSV too, as pandas/img2dataset do
        parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
        return pcsv.read_csv(io.BytesIO(raw), parse_options=parse,
                             convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start}: {e.reason}); "
                         "re-encode the file as UTF-8") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from None


def check_columns(cols: list[str], cfg: DataConfig, path: str) -> None:
    for col, flag in [(cfg.url_col, "--url-col"), (cfg.text_col, "--text-col")] + [
            (c, "extra_cols") for c in cfg.extra_cols]:
        if col not in cols:
            raise InputError(f"{path}: no column {col!r} (columns: {', '.join(cols) or 'none'});"
                             f" name the right one with {flag}")


def validate_first(cfg: DataConfig) -> list[str]:
    """Cheap check on the driver before Ray starts: inputs exist, the first file's columns.
    (Every file is fully validated again by its manifest task.)"""
    files = list_inputs(cfg.input)
    fs, _ = storage.filesystem(cfg.input)
    path = files[0]
    if input_format(path) == "parquet":
        with fs.open_input_file(path) as f:
            cols = pq.ParquetFile(f).schema_arrow.names
    else:
        cols = _read_table(cfg.input, path, head_only=True).column_names
    check_columns(cols, cfg, path)
    return files


def _as_strings(table: pa.Table, col: str, path: str) -> pa.Array:
    arr = table.column(col)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    try:
        return arr.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(f"{path}: column {col!r} must hold text, got {arr.type}: {e}") from None


def url_host(url: str | None) -> str:
    """The host the politeness gate keys a URL by ("" when it has none or does not parse)."""
    try:
        return normalize_host(URL(url.strip()).raw_host or "") if url else ""
    except (ValueError, TypeError):
        return ""


def host_group(url: str | None, groups: int) -> int:
    # a stable hash (not Python's salted hash()): a resumed run must rebuild the same groups
    digest = hashlib.blake2b(url_host(url).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % groups


def _write_row_groups(manifest: pa.Table, cfg: DataConfig, host_groups: int,
                      sink: io.BytesIO) -> list[int] | None:
    """Write ``manifest`` as row groups of ``shard_size`` rows; partitioned, each row group
    holds one host group's rows, and the list of those groups is returned."""
    if not host_groups:
        pq.write_table(manifest, sink, row_group_size=cfg.shard_size)
        return None
    group = pa.array([host_group(u, host_groups) for u in manifest.column("url").to_pylist()],
                     pa.int64())
    order = pc.sort_indices(pa.table({"g": group, "i": pa.array(range(len(group)))}),
                            sort_keys=[("g", "ascending"), ("i", "ascending")])
    manifest, group = manifest.take(order), group.take(order).to_numpy()
    starts = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(group)]
    groups = []
    with pq.ParquetWriter(sink, manifest.schema) as writer:
        for a, b in zip(starts, starts[1:]):
            for lo in range(a, b, cfg.shard_size):   # one write = its own row group
                hi = min(lo + cfg.shard_size, b)
                writer.write_table(manifest.slice(lo, hi - lo), row_group_size=cfg.shard_size)
                groups.append(int(group[a]))
    return groups


def build_manifest(input_uri: str, path: str, file_idx: int, cfg: DataConfig,
                   out_path: str, host_groups: int = 0) -> dict:
    """Read one input file, validate it, write its keyed manifest; returns its plan entry.
    ``host_groups`` > 0 partitions its rows by host (module docstring)."""
    table = _read_table(input_uri, path)
    check_columns(table.column_names, cfg, path)
    if table.num_rows == 0:
        raise InputError(f"{path}: the file has a header but no rows")
    keys = pa.array([f"{file_idx:05d}{r:09d}" for r in range(table.num_rows)], pa.string())
    manifest = pa.table({"key": keys, "url": _as_strings(table, cfg.url_col, path),
                         "text": _as_strings(table, cfg.text_col, path),
                         **{c: table.column(c) for c in cfg.extra_cols}})
    fs, _ = storage.filesystem(cfg.output)
    sink = io.BytesIO()
    groups = _write_row_groups(manifest, cfg, host_groups, sink)
    storage.write_bytes(fs, out_path, sink.getvalue())
    entry = {"path": path, "rows": table.num_rows,
             "shards": -(-table.num_rows // cfg.shard_size) if groups is None else len(groups)}
    if groups is not None:
        entry["host_groups"] = groups
    return entry


def plan_key(cfg: DataConfig, files: list[str]) -> dict:
    """What a manifest depends on; a rerun must match it to resume."""
    return {"inputs": files, "url_col": cfg.url_col, "text_col": cfg.text_col,
            "extra_cols": list(cfg.extra_cols), "shard_size": cfg.shard_size,
            **({"partition_by_host": True, "host_groups_setting": cfg.host_groups}
               if cfg.partition_by_host else {})}


def load_plan(layout: Layout) -> dict | None:
    path = layout.manifest("plan.json")
    if not storage.exists(layout.fs, path):
        return None
    return json.loads(storage.read_bytes(layout.fs, path))


def save_plan(layout: Layout, plan: dict) -> None:
    storage.write_bytes(layout.fs, layout.manifest("plan.json"),
                        json.dumps(plan, indent=1).encode())


def manifest_path(layout: Layout, file_idx: int) -> str:
    return layout.manifest(f"{file_idx:05d}.parquet")


def shard_ids(plan: dict) -> list[tuple[str, int, int, int | None]]:
    """(shard id, file index, row group, host group or None) for every shard of the plan."""
    return [(f"{i:05d}_{g:05d}", i, g, entry["host_groups"][g] if "host_groups" in entry else None)
            for i, entry in enumerate(plan["files"]) for g in range(entry["shards"])]


def read_shard_rows(layout: Layout, file_idx: int, row_group: int) -> pa.Table:
    with layout.fs.open_input_file(manifest_path(layout, file_idx)) as f:
        return pq.ParquetFile(f).read_row_group(row_group)
