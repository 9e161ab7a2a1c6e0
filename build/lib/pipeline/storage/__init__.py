"""Local paths and s3:// URIs behind one interface: `store(uri)` is the Store
(pipeline.storage.base) of a URI, a LocalStore (local.py) or an S3Store (s3.py). The
functions here are what the pipeline calls; each passes the URI to its store. Formats (JSON,
npz, faiss indexes) and scratch folders are the same for every store and live here."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np

from pipeline.errors import InputError
from pipeline.storage import s3
from pipeline.storage.base import Conflict, Store
from pipeline.storage.local import LocalStore
from pipeline.storage.s3 import S3Store

__all__ = ["Conflict", "Store"]  # raised and returned to callers, defined in base.py

_LOCAL, _S3 = LocalStore(), S3Store()


def is_s3(uri: str) -> bool:
    return uri.startswith(s3.PREFIX)


def store(uri: str) -> Store:
    return _S3 if is_s3(uri) else _LOCAL


def join(uri: str, *parts: str) -> str:
    scheme = s3.PREFIX if is_s3(uri) else ""
    out = scheme + uri[len(scheme):].rstrip("/")
    for p in parts:
        out += ("" if out.endswith("/") else "/") + p.strip("/")
    return out


def get_fs(uri: str, timeout: float | None = None):
    """(fsspec filesystem, path without scheme), for readers that take one."""
    return store(uri).get_fs(uri, timeout)


def exists(uri: str) -> bool:
    return store(uri).exists(uri)


def read_bytes(uri: str) -> bytes:
    return store(uri).read_bytes(uri)


def read_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file, in one request (S3: one ranged GET)."""
    return store(uri).read_range(uri, start, stop)


def write_bytes(uri: str, data: bytes, timeout: float | None = None) -> None:
    store(uri).write_bytes(uri, data, timeout)


def upload_file(local: str, uri: str) -> None:
    store(uri).upload_file(local, uri)


def download_file(uri: str, local: str) -> None:
    store(uri).download_file(uri, local)


def open_ranged(uri: str):
    return store(uri).open_ranged(uri)


def delete(uri: str, timeout: float | None = None) -> None:
    store(uri).delete(uri, timeout)


def copy(src: str, dst: str) -> None:
    """Copies one file within a store (S3: server-side; locally a hard link, else a copy)."""
    if is_s3(src) != is_s3(dst):
        raise InputError(f"copy {src} -> {dst}: both must be in one store")
    store(src).copy(src, dst)


def size(uri: str) -> int:
    return store(uri).size(uri)


def listdir(uri: str) -> list[str]:
    return store(uri).listdir(uri)


def is_file(uri: str) -> bool:
    return store(uri).is_file(uri)


def sync_tree(uri: str) -> None:
    """Flushes every file and folder under a local folder to the disk (S3: nothing to do, an
    object is durable once its PUT returns)."""
    store(uri).sync_tree(uri)


def pyarrow_fs(uri: str):
    return store(uri).pyarrow_fs(uri)


def read_tagged(uri: str, timeout: float | None = None) -> tuple[bytes | None, str | None]:
    return store(uri).read_tagged(uri, timeout)


def create_exclusive(uri: str, data: bytes, timeout: float | None = None) -> str:
    return store(uri).create_exclusive(uri, data, timeout)


def replace_if(uri: str, data: bytes, tag: str | None, timeout: float | None = None) -> str:
    """Replaces `uri` only if its current tag is `tag` (None: only if it does not exist)."""
    if tag is None:
        return create_exclusive(uri, data, timeout)
    return store(uri).replace_if(uri, data, tag, timeout)


def delete_if(uri: str, tag: str, timeout: float | None = None) -> bool:
    return store(uri).delete_if(uri, tag, timeout)


def check_uri(uri: str, what: str, folder: bool = False) -> None:
    if is_s3(uri):
        s3.check_uri(uri, what, folder)


def check_reachable(uri: str, what: str, timeout: float = 8.0) -> None:
    if is_s3(uri):
        s3.check_reachable(uri, what, timeout)


def check_conditional_writes(folder: str) -> None:
    """Local folders need no check: their conditional writes lock."""
    if is_s3(folder):
        s3.check_conditional_writes(_S3, folder)


# --- the same for every store -------------------------------------------------------------

def read_json(uri: str):
    return json.loads(read_bytes(uri))


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json_bytes(obj))


def save_npz(uri: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(uri, buf.getvalue())


def save_npy(uri: str, x: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, x)
    write_bytes(uri, buf.getvalue())


def load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)


def load_npz(uri: str) -> dict:
    with np.load(io.BytesIO(read_bytes(uri))) as z:
        return {k: z[k] for k in z.files}


def read_index(uri: str):
    """Reads a faiss index file (not an on-disk one) from a local path or s3:// URI."""
    import faiss

    if not is_s3(uri):
        return faiss.read_index(uri)
    return faiss.deserialize_index(np.frombuffer(read_bytes(uri), np.uint8))


def local_folder(folder_uri: str, names: tuple[str, ...], scratch: str) -> str:
    """A local folder holding `names` of folder_uri: the folder itself when it is local (no
    copy), else `scratch`, where they are downloaded."""
    if not is_s3(folder_uri):
        return os.path.abspath(folder_uri)
    for name in names:
        download_file(join(folder_uri, name), os.path.join(scratch, name))
    return scratch


def sha256_file(local: str) -> str:
    h = hashlib.sha256()
    with open(local, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_uri(uri: str) -> str:
    """sha256 of a local or S3 object, streamed."""
    h = hashlib.sha256()
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def scratch(prefix: str):
    """A local scratch folder for the block, removed on every way out of it."""
    path = tempfile.mkdtemp(prefix=f"ivf-distill-{prefix}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
