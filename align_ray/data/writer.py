"""Output layout of the download stage and the writer of one shard.

    DIR/parquet/SHARD.parquet      samples: key, url, text, jpg, sizes, hashes, extra columns
    DIR/webdataset/SHARD.tar       the same samples as KEY.jpg / KEY.txt / KEY.json (webdataset)
    DIR/dropped/SHARD.parquet      every row that did not make it: key, url, text, reason, detail
    DIR/_shards/SHARD.json         written last: the shard is complete (resume skips it)
    DIR/_manifest/                 keyed copy of the input URL list (see reader.py)
    DIR/stats.json                 run totals: input_rows == output_rows + sum(dropped)

A ``--retry-failed`` pass adds SHARD.rN.parquet/.tar parts with the rows it recovered and
replaces the shard's dropped file by dropped/SHARD.rN.parquet; the marker names the live files.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from align_ray import storage

SAMPLE_FIELDS = [
    ("key", pa.string()), ("url", pa.string()), ("text", pa.string()), ("jpg", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("format", pa.string()), ("sha256", pa.string()), ("phash", pa.uint64()),
    ("text_hash", pa.uint64()), ("final_url", pa.string()), ("num_bytes", pa.int64()),
]
DROPPED_FIELDS = [("key", pa.string()), ("url", pa.string()), ("text", pa.string()),
                  ("reason", pa.string()), ("detail", pa.string()), ("retryable", pa.bool_())]


class Layout:
    def __init__(self, root_uri: str):
        self.uri = root_uri
        self.fs, self.root = storage.filesystem(root_uri)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def marker(self, shard: str) -> str:
        return self.path("_shards", f"{shard}.json")

    def parquet(self, name: str) -> str:
        return self.path("parquet", f"{name}.parquet")

    def tar(self, name: str) -> str:
        return self.path("webdataset", f"{name}.tar")

    def dropped(self, name: str) -> str:
        return self.path("dropped", f"{name}.parquet")


@dataclass
class ShardResult:
    """Rows of one shard (or one retry pass over it), column-wise."""
    samples: dict[str, list]
    dropped: dict[str, list]
    extra_types: dict[str, pa.DataType]


def _schema(fields: list, extra: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema(fields + [(k, t) for k, t in extra.items() if k not in dict(fields)])


def sample_table(res: ShardResult) -> pa.Table:
    return pa.table(res.samples, schema=_schema(SAMPLE_FIELDS, res.extra_types))


def dropped_table(res: ShardResult) -> pa.Table:
    return pa.table(res.dropped, schema=_schema(DROPPED_FIELDS, res.extra_types))


def _tar_bytes(table: pa.Table) -> bytes:
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


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_part(layout: Layout, name: str, res: ShardResult, *, write_parquet: bool,
               write_webdataset: bool) -> list[str]:
    """Write the samples and the dropped rows of one shard part; returns the sample file names."""
    table = sample_table(res)
    written = []
    if table.num_rows:
        if write_parquet:
            storage.write_bytes(layout.fs, layout.parquet(name), _parquet_bytes(table))
            written.append(f"parquet/{name}.parquet")
        if write_webdataset:
            storage.write_bytes(layout.fs, layout.tar(name), _tar_bytes(table))
            written.append(f"webdataset/{name}.tar")
    storage.write_bytes(layout.fs, layout.dropped(name), _parquet_bytes(dropped_table(res)))
    return written


def write_marker(layout: Layout, shard: str, info: dict) -> None:
    storage.write_bytes(layout.fs, layout.marker(shard), json.dumps(info, indent=1).encode())


def read_marker(layout: Layout, shard: str) -> dict:
    return json.loads(storage.read_bytes(layout.fs, layout.marker(shard)))
