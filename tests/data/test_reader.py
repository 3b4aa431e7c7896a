"""Input URL lists: formats, keys, and clear errors for malformed input (no Ray needed)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.data import reader
from align_ray.data.config import DataConfig
from align_ray.data.errors import InputError

ROWS = [("http://a.test/1.jpg", "red circle"), ("http://a.test/2.jpg", "blue, square \"x\""),
        ("http://a.test/3.jpg", None)]


def write(path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.table({"url": [r[0] for r in ROWS], "caption": [r[1] for r in ROWS]}),
                       path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in ROWS))
    else:
        sep = "\t" if fmt == "tsv" else ","
        def q(v):
            return "" if v is None else (v if sep == "\t" else '"' + v.replace('"', '""') + '"')
        path.write_text(f"url{sep}caption\n" + "".join(f"{u}{sep}{q(c)}\n" for u, c in ROWS))


def manifest(tmp_path, src, cfg=None, idx=3):
    cfg = cfg or DataConfig(input=str(src), output=str(tmp_path / "out"), shard_size=2)
    out = str(tmp_path / "m.parquet")
    entry = reader.build_manifest(str(src), str(src), idx, cfg, out)
    return entry, pq.read_table(out)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_formats_and_keys(tmp_path, fmt):
    src = tmp_path / f"urls.{fmt}"
    write(src, fmt)
    entry, table = manifest(tmp_path, src)
    assert entry["rows"] == 3 and entry["shards"] == 2
    assert table.column("key").to_pylist() == ["00003000000000", "00003000000001", "00003000000002"]
    assert table.column("url").to_pylist() == [r[0] for r in ROWS]
    assert table.column("text").to_pylist()[:2] == [r[1] for r in ROWS][:2]
    assert pq.ParquetFile(str(tmp_path / "m.parquet")).num_row_groups == 2


def test_gzip_folder_and_glob(tmp_path):
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "b.csv", "csv")
    raw = (tmp_path / "in" / "b.csv").read_bytes()
    (tmp_path / "in" / "a.csv.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "in" / "_SUCCESS").write_text("")
    files = reader.list_inputs(str(tmp_path / "in"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.csv.gz", "b.csv"]
    assert reader.list_inputs(str(tmp_path / "in" / "*.gz")) == files[:1]
    _, table = manifest(tmp_path, files[0])
    assert table.num_rows == 3


def test_extra_columns_carried(tmp_path):
    src = tmp_path / "u.parquet"
    pq.write_table(pa.table({"link": ["http://x/1"], "alt": ["t"], "concept": ["c1"]}), src)
    cfg = DataConfig(input=str(src), output=str(tmp_path), url_col="link", text_col="alt",
                     extra_cols=["concept"])
    _, table = manifest(tmp_path, src, cfg)
    assert table.column_names == ["key", "url", "text", "concept"]


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"link,caption\nhttp://x/1,a\n", "no column 'url'.*--url-col"),
    (b"url,caption\n", "header but no rows"),
    (b"url,caption\nhttp://x/1,caf\xe9 cr\xe8me\n", "not valid UTF-8"),
])
def test_malformed_inputs_clear_errors(tmp_path, content, message):
    src = tmp_path / "bad.csv"
    src.write_bytes(content)
    with pytest.raises(InputError, match=message):
        manifest(tmp_path, src)


def test_unknown_format_and_missing_input(tmp_path):
    (tmp_path / "urls.xlsx").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown input format"):
        reader.list_inputs(str(tmp_path / "urls.xlsx"))
    with pytest.raises(InputError, match="no input files"):
        reader.list_inputs(str(tmp_path / "nope" / "*.parquet"))


def test_cli_exits_nonzero_with_message_before_starting_ray(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("link,alt\nhttp://x/1,a\n")
    proc = subprocess.run([sys.executable, "-m", "align_ray.cli", "data", "--input", str(src),
                           "--output", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "no column 'url'" in proc.stderr and "--url-col" in proc.stderr


@pytest.mark.parametrize("content,message", [
    (b"", "bad.csv: the file is empty"),
    (b"url,caption\nhttp://x/1,caf\xe9\n", "bad.csv: not valid UTF-8"),
    (b"link,caption\nhttp://x/1,a\n", "bad.csv: no column 'url'"),
])
def test_cli_malformed_input_exit_code_and_message(tmp_path, capsys, content, message):
    from align_ray.cli import main

    src = tmp_path / "bad.csv"
    src.write_bytes(content)
    assert main(["data", "--input", str(src), "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_partition_by_host_groups_rows_by_host_and_keeps_keys(tmp_path):
    hosts = ["a.test", "B.test", "c.test:8080", "d.test", "xn--caf-dma.test", "e.test"]
    urls = [f"http://{hosts[i % 6]}/{i}.jpg" for i in range(60)] + [None, "not a url"]
    src = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"t{i}" for i in range(len(urls))]}), src)
    cfg = DataConfig(input=str(src), output=str(tmp_path / "out"), shard_size=4,
                     partition_by_host=True)
    out = str(tmp_path / "m.parquet")
    entry = reader.build_manifest(str(src), str(src), 0, cfg, out, host_groups=3)
    pf = pq.ParquetFile(out)
    assert entry["shards"] == pf.num_row_groups == len(entry["host_groups"])
    seen = {}
    for g, grp in enumerate(entry["host_groups"]):
        rows = pf.read_row_group(g)
        assert 0 < rows.num_rows <= 4
        for key, url in zip(rows.column("key").to_pylist(), rows.column("url").to_pylist()):
            assert reader.host_group(url, 3) == grp      # one host group per shard
            # the key is still the input row number, whatever the new position
            assert urls[int(key[5:])] == url
            seen[key] = reader.url_host(url)
    assert sorted(seen) == [f"00000{i:09d}" for i in range(len(urls))]
    # a host is in exactly one group; case and ports as the politeness gate keys them
    by_host = {}
    for g, grp in enumerate(entry["host_groups"]):
        for url in pf.read_row_group(g).column("url").to_pylist():
            by_host.setdefault(reader.url_host(url), set()).add(grp)
    assert all(len(v) == 1 for v in by_host.values())
    assert "b.test" in by_host and "" in by_host
    assert len(set(entry["host_groups"])) > 1         # 7 hosts do not all hash alike
    # the host groups come in order, and the rows of a group keep their input order
    assert entry["host_groups"] == sorted(entry["host_groups"])
    keys = pf.read().column("key").to_pylist()
    for grp in set(entry["host_groups"]):
        mine = [k for k in keys if reader.host_group(urls[int(k[5:])], 3) == grp]
        assert mine == sorted(mine)
    # the same input unpartitioned gives the same key set
    plain = reader.build_manifest(str(src), str(src), 0, cfg, str(tmp_path / "p.parquet"))
    assert "host_groups" not in plain
    assert sorted(pq.read_table(tmp_path / "p.parquet").column("key").to_pylist()) == sorted(seen)
    # resuming with partitioning switched on or off is refused (the plan key differs)
    off = DataConfig(input=str(src), output=str(tmp_path / "out"), shard_size=4)
    assert reader.plan_key(off, [str(src)]) != reader.plan_key(cfg, [str(src)])
