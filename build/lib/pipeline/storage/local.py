"""Local paths: writes go to a temporary name, reach the disk and are renamed into place;
conditional writes compare under an flock; joins use copy_file_range."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager

import fsspec

from pipeline.storage.base import Conflict, Store


def fsync_path(path: str) -> None:
    """Flushes a local file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Runs write(tmp) for a temporary name beside `path`, then renames it into place. The
    file reaches the disk before the rename, and the rename before this returns: after a
    crash the name holds either the old content or the whole new one, never an empty file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def _lock(path: str):
    """Serializes compare-and-replace of `path` among processes of this machine."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"),
                 os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStore(Store):
    def get_fs(self, uri: str, timeout: float | None = None):
        return fsspec.filesystem("file"), os.path.abspath(uri)

    def write_bytes(self, uri: str, data: bytes, timeout: float | None = None) -> None:
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
        atomic_write(os.path.abspath(uri), write)

    def upload_file(self, local: str, uri: str) -> None:
        atomic_write(os.path.abspath(uri), lambda tmp: shutil.copyfile(local, tmp))

    def open_ranged(self, uri: str):
        return open(uri, "rb")

    def copy(self, src: str, dst: str) -> None:
        """A hard link (published files are never changed in place), else a copy."""
        spath, dpath = os.path.abspath(src), os.path.abspath(dst)
        os.makedirs(os.path.dirname(dpath), exist_ok=True)
        try:
            os.link(spath, dpath)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise
            atomic_write(dpath, lambda tmp: shutil.copyfile(spath, tmp))

    def sync_tree(self, uri: str) -> None:
        for folder, _, files in os.walk(os.path.abspath(uri)):
            for name in files:
                fsync_path(os.path.join(folder, name))
            fsync_path(folder)

    def pyarrow_fs(self, uri: str):
        from pyarrow.fs import LocalFileSystem

        return LocalFileSystem(), os.path.abspath(uri)

    def read_tagged(self, uri, timeout=None):
        """The tag is a hash of the content."""
        try:
            with open(uri, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, _tag(data)

    def create_exclusive(self, uri, data, timeout=None):
        path = os.path.abspath(uri)
        with _lock(path):
            if os.path.exists(path):
                raise Conflict(uri)
            self.write_bytes(path, data)
        return _tag(data)

    def replace_if(self, uri, data, tag, timeout=None):
        path = os.path.abspath(uri)
        with _lock(path):
            if self.read_tagged(path)[1] != tag:
                raise Conflict(uri)
            self.write_bytes(path, data)
        return _tag(data)

    def delete_if(self, uri, tag, timeout=None):
        path = os.path.abspath(uri)
        with _lock(path):
            if self.read_tagged(path)[1] != tag:
                return False
            os.remove(path)
            fsync_path(os.path.dirname(path))
        return True
