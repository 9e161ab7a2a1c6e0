"""What a store is: the operations the pipeline performs on files, each implemented once for
local paths (pipeline.storage.local) and once for s3:// URIs (pipeline.storage.s3)."""
from __future__ import annotations

import os
from typing import BinaryIO


class Conflict(Exception):
    """A conditional write lost: the object was created or changed by another writer."""


class Store:
    """One kind of storage. `path` arguments are URIs of that kind; `timeout` (seconds), where
    taken, bounds one call instead of the store's ordinary retries (the lease's calls)."""

    def get_fs(self, uri: str, timeout: float | None = None):
        """(fsspec filesystem, path without scheme), for readers that take one."""
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        fs, path = self.get_fs(uri)
        return fs.exists(path)

    def read_bytes(self, uri: str) -> bytes:
        """The whole object in one read (S3: one GET), so that an object replaced meanwhile
        is read whole, old or new."""
        fs, path = self.get_fs(uri)
        return fs.cat_file(path)

    def read_range(self, uri: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) in one read (S3: one GET with a Range header); none for an
        empty range."""
        if stop <= start:
            return b""
        fs, path = self.get_fs(uri)
        return fs.cat_file(path, start=start, end=stop)

    def write_bytes(self, uri: str, data: bytes, timeout: float | None = None) -> None:
        """Writes atomically: a reader sees the old content or the whole new one."""
        raise NotImplementedError

    def upload_file(self, local: str, uri: str) -> None:
        raise NotImplementedError

    def download_file(self, uri: str, local: str) -> None:
        fs, path = self.get_fs(uri)
        fs.get_file(path, local)

    def open_ranged(self, uri: str) -> BinaryIO:
        """A binary file object for seek + read of byte ranges."""
        raise NotImplementedError

    def delete(self, uri: str, timeout: float | None = None) -> None:
        fs, path = self.get_fs(uri, timeout)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def copy(self, src: str, dst: str) -> None:
        """Copies one file within the store without passing its bytes through this process
        where the store allows."""
        raise NotImplementedError

    def size(self, uri: str) -> int:
        fs, path = self.get_fs(uri)
        return int(fs.info(path)["size"])

    def listdir(self, uri: str) -> list[str]:
        """Names directly under a folder or prefix; empty when there is none."""
        fs, path = self.get_fs(uri)
        try:
            return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def is_file(self, uri: str) -> bool:
        fs, path = self.get_fs(uri)
        return fs.isfile(path)

    def sync_tree(self, uri: str) -> None:
        """Makes everything under a folder durable before this returns."""

    def pyarrow_fs(self, uri: str):
        """(pyarrow filesystem, path) for libraries that take one (Ray Train storage)."""
        raise NotImplementedError

    # Conditional writes: the lease and the published pointer are only ever changed by a
    # writer that saw their current version.

    def read_tagged(self, uri: str, timeout: float | None = None
                    ) -> tuple[bytes | None, str | None]:
        """(content, version tag), or (None, None) when there is no such object. The tag is
        what replace_if and delete_if take."""
        raise NotImplementedError

    def create_exclusive(self, uri: str, data: bytes, timeout: float | None = None) -> str:
        """Writes `uri` only if it does not exist; returns its tag. Raises Conflict
        otherwise."""
        raise NotImplementedError

    def replace_if(self, uri: str, data: bytes, tag: str, timeout: float | None = None) -> str:
        """Replaces `uri` only if its current tag is `tag`; returns the new tag. Raises
        Conflict when another writer got there first."""
        raise NotImplementedError

    def delete_if(self, uri: str, tag: str, timeout: float | None = None) -> bool:
        """Deletes `uri` if its tag is still `tag`; returns whether it did."""
        raise NotImplementedError
