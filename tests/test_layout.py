"""The stage layout (align_ray/layout.py): the files a stage writes are the files the next one
finds, completion means a complete stats.json, and "stage DIR -> DIR/parquet" is resolved once."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray import layout
from align_ray.layout import Layout


def _samples(keys: list[str]) -> pa.Table:
    n = len(keys)
    cols = {name: pa.nulls(n, t) for name, t in layout.SAMPLE_FIELDS}
    cols.update(key=pa.array(keys), text=pa.array([f"caption {k}" for k in keys]),
                jpg=pa.array([k.encode() * 3 for k in keys], pa.binary()))
    return pa.table(cols, schema=layout.schema(layout.SAMPLE_FIELDS))


def test_write_shard_then_read_it_back(tmp_path):
    out = Layout(str(tmp_path / "stage"))
    parts = out.write_samples("00000_00000", _samples(["a", "b"]), parquet=True, webdataset=True)
    assert parts == ["parquet/00000_00000.parquet", "webdataset/00000_00000.tar"]
    dropped = pa.table({n: pa.array([], t) for n, t in layout.DROPPED_FIELDS})
    assert out.write_dropped("00000_00000", dropped) == "dropped/00000_00000.parquet"
    assert out.markers() == {}                          # no marker yet: the shard is not done
    out.write_marker("00000_00000", {"shard": "00000_00000", "parts": parts})
    assert out.markers()["00000_00000"]["parts"] == parts
    assert out.read_marker("00000_00000")["parts"] == parts
    assert pq.read_table(out.parquet("00000_00000")).column("key").to_pylist() == ["a", "b"]
    with tarfile.open(out.tar("00000_00000")) as tar:
        names = tar.getnames()
        assert names == ["a.jpg", "a.txt", "a.json", "b.jpg", "b.txt", "b.json"]
        assert tar.extractfile("b.txt").read() == b"caption b"
        assert json.loads(tar.extractfile("a.json").read())["key"] == "a"
    # deterministic bytes: a rerun of a shard rewrites the same files
    assert layout.tar_bytes(_samples(["a"])) == layout.tar_bytes(_samples(["a"]))


def test_an_empty_shard_writes_only_its_dropped_rows(tmp_path):
    out = Layout(str(tmp_path / "stage"))
    assert out.write_samples("s", _samples([]), parquet=True, webdataset=True) == []
    assert not (tmp_path / "stage" / "parquet").exists()


def test_is_complete_follows_stats_json(tmp_path):
    uri = str(tmp_path / "stage")
    assert not layout.is_complete(uri) and Layout(uri).stats() is None
    Layout(uri).write_stats({"complete": False, "input": "in"})
    assert not layout.is_complete(uri)
    Layout(uri).write_stats({"complete": True, "input": "in", "note": "é"})
    assert layout.is_complete(uri) and layout.is_complete(uri, input="in")
    assert not layout.is_complete(uri, input="other")   # made from another input: redo it
    assert Layout(uri).stats()["note"] == "é"


def test_parquet_files_stage_dir_file_folder_glob(tmp_path):
    stage = Layout(str(tmp_path / "stage"))
    stage.write_samples("s1", _samples(["a"]), parquet=True, webdataset=False)
    stage.write_samples("s0", _samples(["b"]), parquet=True, webdataset=False)
    stage.write_dropped("s0", pa.table({"key": ["x"]}))   # never read as samples
    fs, files = layout.parquet_files(stage.uri)
    assert [f.rsplit("/", 2)[-2:] for f in files] == [["parquet", "s0.parquet"],
                                                       ["parquet", "s1.parquet"]]
    assert layout.parquet_files(files[1])[1] == [files[1]]
    assert layout.parquet_files(str(tmp_path / "stage" / "parquet" / "s*.parquet"))[1] == files
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        layout.parquet_files(str(tmp_path / "nothing"))


def test_parquet_bytes_round_trip():
    table = _samples(["k"])
    assert pq.read_table(io.BytesIO(layout.parquet_bytes(table))).equals(table)


def test_dropped_columns_lead_the_schema_with_extras_after():
    s = layout.schema(layout.DROPPED_FIELDS, {"noise": pa.string(), "key": pa.string()})
    assert s.names == layout.DROPPED_COLUMNS + ["noise"]


def test_require_columns_names_what_is_missing_and_what_is_not_bytes(tmp_path):
    out = Layout(str(tmp_path / "stage"))
    out.write_samples("00000", _samples(["a"]), parquet=True, webdataset=False)
    fs, files = layout.parquet_files(out.uri)
    schema = layout.schema_of(fs, files)
    assert set(schema.names) == set(layout.SAMPLE_COLUMNS)
    layout.require_columns(out.uri, schema, ["jpg", "text", None], "hint",   # None: not asked
                           image_col="jpg")
    with pytest.raises(ValueError, match=r"stage: no column 'image', 'caption' \(columns: "
                                         r"\[.*'jpg'.*\]\); set --image-col"):
        layout.require_columns(out.uri, schema, ["image", "text", "caption", "image"],
                               "set --image-col")
    with pytest.raises(ValueError, match=r"column 'text' holds string, not image bytes"):
        layout.require_columns(out.uri, schema, ["text"], "set --image-col", image_col="text")
    large = pa.schema([("img", pa.large_binary())])
    layout.require_columns(out.uri, large, ["img"], "", image_col="img")
