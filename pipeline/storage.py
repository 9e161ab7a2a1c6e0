"""Local paths and s3:// URIs behind one small interface (fsspec/s3fs underneath).

The S3 endpoint comes from the standard AWS environment (`AWS_ENDPOINT_URL` for a local or
non-AWS endpoint); credentials come from the environment or instance roles, never from configs.
Writes are atomic: local files go to a temporary name and are renamed; an S3 object appears
whole with its single PUT.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import uuid

import fsspec
import numpy as np


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def get_fs(uri: str):
    """Returns (filesystem, path-without-scheme)."""
    if is_s3(uri):
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # Cached instances are shared by fsspec; skip_instance_cache avoids stale connections
        # after a fork (Ray workers) while keeping one client per call site cheap enough.
        # Standard-mode retries with exponential backoff ride out throttling and an endpoint
        # that drops away for a few seconds (connection refused, 5xx).
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                               config_kwargs={"retries": {"max_attempts": 10,
                                                          "mode": "standard"}})
        return fs, uri[len("s3://"):]
    fs = fsspec.filesystem("file")
    return fs, os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = get_fs(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic_local(path, write)


def _atomic_local(path: str, write) -> None:
    """Runs write(tmp) for a temporary name beside `path`, then renames it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def save_npz(uri: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(uri, buf.getvalue())


def load_npz(uri: str) -> dict:
    with np.load(io.BytesIO(read_bytes(uri))) as z:
        return {k: z[k] for k in z.files}


def upload_file(local: str, uri: str) -> None:
    fs, path = get_fs(uri)
    if is_s3(uri):
        fs.put_file(local, path)
        return
    _atomic_local(path, lambda tmp: fs.copy(local, tmp))


def open_ranged(uri: str):
    """A binary file object for seek + read of byte ranges (S3: one ranged GET per read)."""
    fs, path = get_fs(uri)
    if is_s3(uri):
        return fs.open(path, "rb", cache_type="none")
    return open(path, "rb")


def download_file(uri: str, local: str) -> None:
    fs, path = get_fs(uri)
    fs.get_file(path, local)


def delete(uri: str) -> None:
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sha256_file(local: str) -> str:
    h = hashlib.sha256()
    with open(local, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_scratch(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"vq-{prefix}-")


def pyarrow_fs(uri: str):
    """(pyarrow filesystem, path) for libraries that take one (Ray Train storage)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if is_s3(uri):
        fs, path = get_fs(uri)
        return PyFileSystem(FSSpecHandler(fs)), path
    return LocalFileSystem(), os.path.abspath(uri)
