"""The stage output layout: the contract between ``data``, ``filter``, ``train``/``eval`` and
``index``.  Every stage writes and reads a stage directory only through this module.

    DIR/parquet/SHARD.parquet      samples: key, url, text, jpg, sizes, hashes, extra columns
    DIR/webdataset/SHARD.tar       the same samples as KEY.jpg / KEY.txt / KEY.json (webdataset)
    DIR/dropped/SHARD.parquet      every row that did not make it: key, url, text, reason, detail
    DIR/_shards/SHARD.json         written last: the shard is complete (resume skips it)
    DIR/_manifest/                 keyed copy of the input URL list (data/reader.py)
    DIR/stats.json                 run totals: input_rows == output_rows + sum(dropped);
                                   ``complete: true`` once every shard is done

A shard marker names the shard's live files (``parts``, ``dropped_file``): a ``--retry-failed``
pass adds SHARD.rN.parquet/.tar parts and replaces the dropped file, and the filter carries the
download stage's dropped files over as dropped/download-SHARD.parquet.  The filter writes the
same layout, so a filter output is also a valid input of train, eval and index.
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from align_ray import storage

PARQUET, WEBDATASET, DROPPED, SHARDS, MANIFEST = (
    "parquet", "webdataset", "dropped", "_shards", "_manifest")
STATS = "stats.json"

SAMPLE_FIELDS = [
    ("key", pa.string()), ("url", pa.string()), ("text", pa.string()), ("jpg", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("format", pa.string()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("text_hash", pa.uint64()), ("final_url", pa.string()), ("num_bytes", pa.int64()),
]
DROPPED_FIELDS = [("key", pa.string()), ("url", pa.string()), ("text", pa.string()),
                  ("reason", pa.string()), ("detail", pa.string()), ("retryable", pa.bool_())]
SAMPLE_COLUMNS = [name for name, _ in SAMPLE_FIELDS]
DROPPED_COLUMNS = [name for name, _ in DROPPED_FIELDS]


def schema(fields: list, extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """``fields`` followed by the input's extra columns (carried through every stage)."""
    extra = extra or {}
    return pa.schema(fields + [(k, t) for k, t in extra.items() if k not in dict(fields)])


class Layout:
    """The files of one stage directory (local path or ``s3://`` URI)."""

    def __init__(self, root_uri: str):
        self.uri = root_uri
        self.fs, self.root = storage.filesystem(root_uri)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def clear(self) -> None:
        """Empty the stage directory (``--overwrite``); the directory itself stays."""
        if storage.exists(self.fs, self.root):
            self.fs.delete_dir_contents(self.root, missing_dir_ok=True)

    def marker(self, shard: str) -> str:
        return self.path(SHARDS, f"{shard}.json")

    def parquet(self, name: str) -> str:
        return self.path(PARQUET, f"{name}.parquet")

    def tar(self, name: str) -> str:
        return self.path(WEBDATASET, f"{name}.tar")

    def dropped(self, name: str) -> str:
        return self.path(DROPPED, f"{name}.parquet")

    def manifest(self, name: str) -> str:
        return self.path(MANIFEST, name)

    # -- writing: samples / dropped rows of one shard part, then (last) its marker --

    def write_samples(self, name: str, table: pa.Table, *, parquet: bool,
                      webdataset: bool) -> list[str]:
        """The kept rows of one shard part; returns the part names a marker lists."""
        parts = []
        if table.num_rows and parquet:
            storage.write_bytes(self.fs, self.parquet(name), parquet_bytes(table))
            parts.append(f"{PARQUET}/{name}.parquet")
        if table.num_rows and webdataset:
            storage.write_bytes(self.fs, self.tar(name), tar_bytes(table))
            parts.append(f"{WEBDATASET}/{name}.tar")
        return parts

    def write_dropped(self, name: str, table: pa.Table) -> str:
        """The dropped rows of one shard part (written even when empty); returns its name."""
        storage.write_bytes(self.fs, self.dropped(name), parquet_bytes(table))
        return f"{DROPPED}/{name}.parquet"

    def write_marker(self, shard: str, info: dict) -> None:
        storage.write_bytes(self.fs, self.marker(shard), json.dumps(info, indent=1).encode())

    def read_marker(self, shard: str) -> dict:
        return json.loads(storage.read_bytes(self.fs, self.marker(shard)))

    def markers(self) -> dict[str, dict]:
        """Every finished shard's marker, by shard id."""
        folder = self.path(SHARDS)
        if not storage.exists(self.fs, folder):
            return {}
        out = {}
        for path in storage.list_files(self.fs, folder):
            if path.endswith(".json"):
                info = json.loads(storage.read_bytes(self.fs, path))
                out[info["shard"]] = info
        return out

    def write_stats(self, stats: dict) -> None:
        """Written last by a stage: with ``complete: true`` it marks the directory finished."""
        storage.write_bytes(self.fs, self.path(STATS),
                            json.dumps(stats, indent=1, ensure_ascii=False).encode())

    def stats(self) -> dict | None:
        path = self.path(STATS)
        if not storage.exists(self.fs, path):
            return None
        return json.loads(storage.read_bytes(self.fs, path))

    def is_complete(self, input: str | None = None) -> bool:
        """Every shard is done (``stats.json`` says so); with ``input``, also made from it."""
        stats = self.stats()
        return bool(stats and stats.get("complete")
                    and (input is None or stats.get("input") == input))


def is_complete(uri: str, input: str | None = None) -> bool:
    """True when the stage directory ``uri`` holds a finished run (over ``input``, if given)."""
    return Layout(uri).is_complete(input)


def parquet_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted parquet files) behind ``uri``: a stage directory (its DIR/parquet),
    or any parquet file, folder or glob, local or ``s3://``.  FileNotFoundError when none."""
    fs, path = storage.filesystem(uri)
    sub = storage.join(path, PARQUET)
    if fs.get_file_info(sub).type == pafs.FileType.Directory:
        path = sub
    files = [f for f in storage.list_files(fs, path) if f.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"{uri}: no parquet files found")
    return fs, files


def schema_of(fs: pafs.FileSystem, files: list[str]) -> pa.Schema:
    """The schema of a stage's parquet files (read from the first: one stage, one schema)."""
    return pq.read_schema(files[0], filesystem=fs)


def default_image_col(names: set[str] | list[str]) -> str:
    """The image column when none is given: ``jpg`` (what the data and filter stages write) if
    present, else ``image`` (a common name in other parquet sets, the dev set's)."""
    return "jpg" if "jpg" in names else "image"


def require_columns(where: str, schema: pa.Schema, wanted: list[str | None], hint: str, *,
                    image_col: str | None = None) -> None:
    """ValueError naming the ``wanted`` columns (None: not asked for) missing from ``schema``,
    the columns there are, and ``hint`` (which option names them); also when ``image_col``
    holds something other than bytes.  A stage checks this before it starts any Ray work, so
    a wrong column is one clear line, not a KeyError or TypeError in every worker."""
    names = schema.names
    missing = [c for c in dict.fromkeys(wanted) if c is not None and c not in names]
    if missing:
        raise ValueError(f"{where}: no column {', '.join(map(repr, missing))} "
                         f"(columns: {sorted(names)}); {hint}")
    if image_col is not None:
        t = schema.field(image_col).type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_binary_view(t)):
            raise ValueError(f"{where}: column {image_col!r} holds {t}, not image bytes "
                             f"(encoded JPEG, PNG, WebP...); {hint}")


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def tar_bytes(table: pa.Table) -> bytes:
    """webdataset layout: consecutive KEY.jpg, KEY.txt, KEY.json members, deterministic."""
    buf = io.BytesIO()
    meta_cols = [c for c in table.column_names if c != "jpg"]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in table.to_pylist():
            meta = {c: row[c] for c in meta_cols}
            for ext, payload in (("jpg", row["jpg"]), ("txt", (row["text"] or "").encode()),
                                 ("json", json.dumps(meta, ensure_ascii=False).encode())):
                info = tarfile.TarInfo(f"{row['key']}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()
