"""Local paths and s3:// URIs behind one small interface (fsspec/s3fs underneath).

The S3 endpoint comes from the standard AWS environment (`AWS_ENDPOINT_URL` for a local or
non-AWS endpoint); credentials come from the environment or instance roles, never from configs.
Writes are atomic: local files go to a temporary name and are renamed; an S3 object appears
whole with its single PUT.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager

import fsspec
import numpy as np


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def check_uri(uri: str, what: str, folder: bool = False) -> None:
    """Refuses an s3:// URI with no bucket, and (folder=True, an output) one with a bucket but
    no prefix: a run writes a lease, stages and versions beside each other, which a bucket's
    root shares with everything else in it."""
    if not is_s3(uri):
        return
    bucket, _, prefix = uri[len("s3://"):].strip("/").partition("/")
    if not bucket:
        raise ValueError(f"{what}: {uri!r} names no bucket; give s3://BUCKET/PREFIX")
    if folder and not prefix:
        raise ValueError(f"{what}: {uri!r} is a whole bucket; give a prefix inside it, e.g. "
                         f"s3://{bucket}/runs/NAME")


_S3 = {}  # (pid, endpoint, timeout) -> S3FileSystem


def _endpoint() -> str | None:
    """The S3 endpoint of the standard AWS environment (None: AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def get_fs(uri: str, timeout: float | None = None):
    """Returns (filesystem, path-without-scheme). timeout: see _s3fs (S3 only)."""
    if is_s3(uri):
        return _s3fs(timeout), uri[len("s3://"):]
    fs = fsspec.filesystem("file")
    return fs, os.path.abspath(uri)


def _s3fs(timeout: float | None = None):
    """One S3 client per process, endpoint and time bound: a new client costs a connection and
    a credentials lookup. Keyed by pid, so a forked process never shares its parent's
    connections. Listings are not cached: another process may change the prefix at any time
    (the lease, the published pointer).

    timeout None: standard-mode retries with exponential backoff, which ride out throttling
    and an endpoint that drops away for a few seconds. A timeout (seconds) bounds one call of
    a small object instead: one attempt, half of it to connect and half to read. The lease's
    renewals and the writes made under it use such a client and retry themselves, so that no
    call outlasts the lease."""
    import s3fs

    endpoint = _endpoint()
    key = (os.getpid(), endpoint, timeout)
    if key not in _S3:
        if timeout is None:
            config, retries = {"retries": {"max_attempts": 10, "mode": "standard"}}, 5
        else:
            config = {"retries": {"max_attempts": 1, "mode": "standard"},
                      "connect_timeout": timeout / 2, "read_timeout": timeout / 2}
            retries = 1
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                               use_listings_cache=False, config_kwargs=config)
        fs.retries = retries  # s3fs's own retry loop, around botocore's
        _S3[key] = fs
    return _S3[key]


def join(uri: str, *parts: str) -> str:
    scheme = "s3://" if is_s3(uri) else ""
    out = scheme + uri[len(scheme):].rstrip("/")
    for p in parts:
        out += ("" if out.endswith("/") else "/") + p.strip("/")
    return out


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole object in one GET (S3), so that an object replaced meanwhile is read whole,
    old or new, never refused halfway as a file that changed under a reader."""
    fs, path = get_fs(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, timeout: float | None = None) -> None:
    fs, path = get_fs(uri, timeout)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic_local(path, write)


def _atomic_local(path: str, write) -> None:
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


def fsync_path(path: str) -> None:
    """Flushes a local file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(uri: str) -> None:
    """Flushes every file and folder under a local folder to the disk (S3: nothing to do, an
    object is durable once its PUT returns)."""
    if is_s3(uri):
        return
    root = get_fs(uri)[1]
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


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


def local_folder(folder_uri: str, names: tuple[str, ...], scratch: str) -> str:
    """A local folder holding `names` of folder_uri: the folder itself when it is local (no
    copy), else `scratch`, where they are downloaded."""
    if not is_s3(folder_uri):
        return get_fs(folder_uri)[1]
    for name in names:
        download_file(join(folder_uri, name), os.path.join(scratch, name))
    return scratch


def delete(uri: str, timeout: float | None = None) -> None:
    fs, path = get_fs(uri, timeout)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def sha256_file(local: str) -> str:
    h = hashlib.sha256()
    with open(local, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def scratch(prefix: str):
    """A local scratch folder for the block, removed on every way out of it."""
    path = tempfile.mkdtemp(prefix=f"vq-{prefix}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pyarrow_fs(uri: str):
    """(pyarrow filesystem, path) for libraries that take one (Ray Train storage)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if is_s3(uri):
        fs, path = get_fs(uri)
        return PyFileSystem(FSSpecHandler(fs)), path
    return LocalFileSystem(), os.path.abspath(uri)


# Conditional writes: the lease and the published pointer are only ever changed by a writer
# that saw their current version. On S3 that is a PUT with If-None-Match: * (create) or
# If-Match: <ETag> (replace); locally an exclusive create, or a compare under an flock.


class Conflict(Exception):
    """A conditional write lost: the object was created or changed by another writer."""


def _status(e: BaseException) -> int | None:
    """The HTTP status of the S3 error behind an exception s3fs raised (it translates
    botocore's ClientError and keeps it as the cause), or None."""
    while e is not None:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        e = e.__cause__ or e.__context__
    return None


def _s3_put(uri: str, data: bytes, timeout: float | None, **condition) -> str:
    """One conditional PUT. A precondition failure is told by its status: 412, or 409 (a
    concurrent conditional write; retried). A 412 may also answer botocore's retry of a PUT
    that succeeded but whose response was lost: the object is read back, and if it holds
    exactly these bytes (which carry a unique token) the write was ours."""
    fs, path = get_fs(uri, timeout)
    bucket, key = path.split("/", 1)
    attempt = 0
    while True:
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                              **condition)["ETag"]
        except OSError as e:
            status = _status(e)
            if status == 409 and attempt < 3:
                time.sleep(0.1 * 2 ** attempt)
                attempt += 1
                continue
            if status not in (409, 412):
                raise
            held, tag = read_tagged(uri, timeout)
            if held == data:
                return tag
            raise Conflict(uri) from None


@contextmanager
def _local_lock(path: str):
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


def read_tagged(uri: str, timeout: float | None = None) -> tuple[bytes | None, str | None]:
    """(content, version tag), or (None, None) when there is no such object. The tag is what
    replace_if takes: the S3 ETag, or a hash of a local file's content. On S3 the content and
    the tag come from two requests; a single PUT's ETag is the MD5 of its content, so a pair
    that does not match (the object changed in between) is read again."""
    fs, path = get_fs(uri, timeout)
    if is_s3(uri):
        for _ in range(5):
            try:
                tag = fs.info(path, refresh=True)["ETag"]
                data = fs.cat_file(path)
            except FileNotFoundError:
                return None, None
            if hashlib.md5(data).hexdigest() == tag.strip('"'):
                return data, tag
        return data, tag  # multipart ETags are no MD5: the last pair read
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    return data, _tag(data)


def create_exclusive(uri: str, data: bytes, timeout: float | None = None) -> str:
    """Writes `uri` only if it does not exist; returns its tag. Raises Conflict otherwise."""
    if is_s3(uri):
        return _s3_put(uri, data, timeout, IfNoneMatch="*")
    path = get_fs(uri)[1]
    with _local_lock(path):
        if os.path.exists(path):
            raise Conflict(uri)
        write_bytes(uri, data)
    return _tag(data)


def replace_if(uri: str, data: bytes, tag: str | None, timeout: float | None = None) -> str:
    """Replaces `uri` only if its current tag is `tag` (None: only if it does not exist).
    Returns the new tag; raises Conflict when another writer got there first."""
    if tag is None:
        return create_exclusive(uri, data, timeout)
    if is_s3(uri):
        return _s3_put(uri, data, timeout, IfMatch=tag)
    path = get_fs(uri)[1]
    with _local_lock(path):
        if read_tagged(uri)[1] != tag:
            raise Conflict(uri)
        write_bytes(uri, data)
    return _tag(data)


def delete_if(uri: str, tag: str, timeout: float | None = None) -> bool:
    """Deletes `uri` if its tag is still `tag`; returns whether it did. (S3's DELETE takes no
    If-Match everywhere: there the tag is compared just before an unconditional delete.)"""
    if is_s3(uri):
        if read_tagged(uri, timeout)[1] != tag:
            return False
        fs, path = get_fs(uri, timeout)
        fs.rm(path)
        return True
    path = get_fs(uri)[1]
    with _local_lock(path):
        if read_tagged(uri)[1] != tag:
            return False
        os.remove(path)
        fsync_path(os.path.dirname(path))
    return True


def check_conditional_writes(folder: str) -> None:
    """Raises RuntimeError unless the store behind an s3:// folder refuses a second
    If-None-Match: * create and an If-Match on a stale ETag, as the lease and the pointer
    need. Tried on a scratch key, deleted after. Local folders need no check."""
    if not is_s3(folder):
        return
    uri = join(folder, f"_probe-{uuid.uuid4().hex}")
    try:
        create_exclusive(uri, b"first")
        stale = '"' + "0" * 32 + '"'
        for what, attempt in (("If-None-Match: *", lambda: create_exclusive(uri, b"second")),
                              ("If-Match", lambda: replace_if(uri, b"third", stale))):
            try:
                attempt()
            except Conflict:
                continue
            raise RuntimeError(
                f"the S3 store at {folder} ignores {what} on PUT: it cannot keep two jobs "
                "from writing one output, nor keep the published pointer consistent. Use a "
                "store that enforces conditional writes (AWS S3 does), or set "
                "publish.require_conditional_writes=false to go on without that protection")
    finally:
        delete(uri)


def copy(src: str, dst: str) -> None:
    """Copies one file within a store: a server-side copy on S3 (multipart for large objects),
    a hard link locally (published files are never changed in place), else a copy."""
    fs, spath = get_fs(src)
    _, dpath = get_fs(dst)
    if is_s3(src):
        fs.copy(spath, dpath)
        return
    os.makedirs(os.path.dirname(dpath), exist_ok=True)
    try:
        os.link(spath, dpath)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise
        _atomic_local(dpath, lambda tmp: shutil.copyfile(spath, tmp))


# S3 multipart limits: every part but the last is at least 5 MiB, none above 5 GiB.
MIN_PART, MAX_PART = 5 << 20, 5 << 30


def concat(srcs: list[str], dst: str) -> dict:
    """Writes dst as the sources one after another, without this process copying them.

    On S3: one multipart upload whose parts are server-side copies of the sources
    (UploadPartCopy). S3 wants every part but the last to be at least 5 MiB, so sources
    smaller than that are joined here first: at most MIN_PART bytes a part pass through this
    process. Locally: os.copy_file_range (the kernel copies, without user-space buffers).
    Returns {"server_side": bytes copied by the store, "through_here": bytes read here}.
    """
    if not is_s3(dst):
        return _concat_local([get_fs(s)[1] for s in srcs], get_fs(dst)[1])
    fs, dpath = get_fs(dst)
    bucket, key = dpath.split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    parts, buf, stats = [], bytearray(), {"server_side": 0, "through_here": 0}

    def put(body: bytes) -> None:
        r = fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload,
                       PartNumber=len(parts) + 1, Body=bytes(body))
        parts.append({"PartNumber": len(parts) + 1, "ETag": r["ETag"]})

    def copy_range(src: str, a: int, b: int) -> None:
        """Bytes [a, b) of src, b - a >= MIN_PART, in parts of at most MAX_PART."""
        n = -(-(b - a) // MAX_PART)
        cuts = [a + (b - a) * i // n for i in range(n + 1)]
        for lo, hi in zip(cuts, cuts[1:]):
            r = fs.call_s3("upload_part_copy", Bucket=bucket, Key=key, UploadId=upload,
                           PartNumber=len(parts) + 1, CopySource=src,
                           CopySourceRange=f"bytes={lo}-{hi - 1}")
            parts.append({"PartNumber": len(parts) + 1, "ETag": r["CopyPartResult"]["ETag"]})
        stats["server_side"] += b - a

    def read(src: str, a: int, b: int) -> bytes:
        with fs.open(src, "rb", cache_type="none") as f:
            f.seek(a)
            data = f.read(b - a)
        stats["through_here"] += len(data)
        return data

    try:
        for uri in srcs:
            src = get_fs(uri)[1]
            n, at = int(fs.info(src)["size"]), 0
            if buf or n < MIN_PART:  # top the buffer up to a whole part from this source
                take = min(n, MIN_PART - len(buf))
                buf += read(src, 0, take)
                at = take
                if len(buf) >= MIN_PART:
                    put(buf)
                    buf = bytearray()
            if n - at >= MIN_PART:
                copy_range(src, at, n)
            elif at < n:
                buf += read(src, at, n)  # the tail of a source too small to copy alone
        if buf or not parts:
            put(buf)
        fs.call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload,
                   MultipartUpload={"Parts": parts})
    except BaseException:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
        raise
    fs.invalidate_cache(dpath)
    return stats


def _concat_local(srcs: list[str], dst: str) -> dict:
    def write(tmp):
        with open(tmp, "wb") as out:
            for src in srcs:
                with open(src, "rb") as f:
                    left = os.fstat(f.fileno()).st_size
                    while left:
                        done = os.copy_file_range(f.fileno(), out.fileno(), min(left, 1 << 30))
                        if not done:
                            raise OSError(f"{src}: copy_file_range stopped {left} bytes short")
                        left -= done

    os.makedirs(os.path.dirname(dst), exist_ok=True)
    _atomic_local(dst, write)
    return {"server_side": sum(os.path.getsize(s) for s in srcs), "through_here": 0}


def size(uri: str) -> int:
    fs, path = get_fs(uri)
    return int(fs.info(path)["size"])


def sha256_uri(uri: str) -> str:
    """sha256 of a local or S3 object, streamed."""
    h = hashlib.sha256()
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def listdir(uri: str) -> list[str]:
    """Names directly under a folder or prefix; empty when there is none."""
    fs, path = get_fs(uri)
    try:
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def is_file(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.isfile(path)


def read_index(uri: str):
    """Reads a faiss index file (not an on-disk one) from a local path or s3:// URI."""
    import faiss

    if not is_s3(uri):
        return faiss.read_index(uri)
    return faiss.deserialize_index(np.frombuffer(read_bytes(uri), np.uint8))


def check_reachable(uri: str, what: str, timeout: float = 8.0) -> None:
    """Raises ValueError within about `timeout` seconds, naming the URI and what failed, when
    an s3:// URI's bucket cannot be used: the endpoint is down, the credentials are refused,
    or the bucket does not exist. (The ordinary client retries such errors for minutes.)"""
    if not is_s3(uri):
        return
    fs, path = get_fs(uri, timeout)
    bucket = path.split("/", 1)[0]
    endpoint = _endpoint() or "AWS S3"
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except Exception as e:  # noqa: BLE001 - every failure here becomes the user's message
        status = _status(e)
        if status == 404:
            why = f"the bucket {bucket!r} does not exist"
        elif status in (401, 403):
            why = (f"access to the bucket {bucket!r} was refused ({e}); check the AWS "
                   "credentials in the environment")
        elif status is None:
            why = f"the endpoint {endpoint} cannot be reached ({type(e).__name__}: {e})"
        else:
            why = f"S3 answered {status} ({e})"
        raise ValueError(f"{what}: {uri}: {why}") from None
