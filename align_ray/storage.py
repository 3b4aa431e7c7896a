"""Local paths and ``s3://`` URIs behind one pyarrow filesystem API.

S3 endpoints other than AWS (MinIO, SeaweedFS, moto...) come from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``; credentials and region from the usual AWS environment/config chain.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path-within-it) for a local path or ``s3://bucket/key`` URI."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            scheme, _, rest = endpoint.partition("://")
            kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def is_uri(location: str | None) -> bool:
    """An object-store location (``s3://``), as opposed to a path on this node's disk."""
    return bool(location) and str(location).startswith("s3://")


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Files of a folder (recursive), a glob pattern, or the single file ``path``; sorted."""
    if any(c in path for c in "*?["):
        base = path
        while any(c in base for c in "*?["):
            base = posixpath.dirname(base)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos
                      if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and not posixpath.basename(i.path).startswith((".", "_")))
    return []


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that readers never see half of it (tmp + rename on local disks;
    object stores publish a PUT atomically)."""
    if is_local(fs):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    """A small file (a config YAML) from a local path or an ``s3://`` URI.  A job on a cluster
    can then name a config that no node has on its disk.  A missing file raises
    FileNotFoundError either way."""
    location = str(location)
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = filesystem(location)
    if not exists(fs, path):
        raise FileNotFoundError(f"{location}: no such object")
    return read_bytes(fs, path).decode()


def delete_quietly(fs: pafs.FileSystem, path: str) -> bool:
    """Delete a file that may already be gone; returns whether it existed."""
    try:
        fs.delete_file(path)
        return True
    except FileNotFoundError:
        return False


def check_writable(uri: str) -> None:
    """OSError unless the folder ``uri`` (local or ``s3://``) takes a write: a stage checks its
    output before it starts Ray, so a wrong bucket, endpoint or path is one clear line at
    once.  The probe file is deleted, and a local folder it had to create is removed again
    (on S3, Arrow keeps the emptied folder as a zero-byte ``KEY/`` marker object)."""
    fs, path = filesystem(uri)
    created, p = None, path   # the topmost local folder the write will create
    while is_local(fs) and fs.get_file_info(p).type == pafs.FileType.NotFound:
        created, p = p, posixpath.dirname(p)
        if p == created:
            break
    probe = join(path, f".align-ray-write-check-{uuid.uuid4().hex[:8]}")
    write_bytes(fs, probe, b"")
    fs.delete_file(probe)
    if created:
        fs.delete_dir(created)


def upload_dir(local: str | Path, uri: str, skip: tuple[str, ...] = (), last: str = "") -> None:
    """Copy a local folder to ``uri`` (files whose relative path starts with one of ``skip`` are
    left out); ``last`` (a completion marker) is written after every other file."""
    local = Path(local)
    fs, base = filesystem(uri)
    files = [f for f in sorted(local.rglob("*")) if f.is_file()
             and not (skip and f.relative_to(local).as_posix().startswith(skip))]
    for f in sorted(files, key=lambda f: f.relative_to(local).as_posix() == last):
        write_bytes(fs, join(base, f.relative_to(local).as_posix()), f.read_bytes())
