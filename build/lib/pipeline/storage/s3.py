"""s3:// URIs through s3fs: one client per process and time bound, conditional PUTs told
apart by their HTTP status, and the checks that a bucket is usable at all.

The endpoint comes from the standard AWS environment (`AWS_ENDPOINT_URL` for a local or
non-AWS endpoint); credentials come from the environment or instance roles, never from
configs. An object appears whole with its single PUT."""
from __future__ import annotations

import hashlib
import os
import time
import uuid

from pipeline.errors import InputError
from pipeline.storage.base import Conflict, Store

PREFIX = "s3://"

_CLIENTS = {}  # (pid, endpoint, timeout) -> S3FileSystem


def endpoint() -> str | None:
    """The S3 endpoint of the standard AWS environment (None: AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client(timeout: float | None = None):
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

    url = endpoint()
    key = (os.getpid(), url, timeout)
    if key not in _CLIENTS:
        if timeout is None:
            config, retries = {"retries": {"max_attempts": 10, "mode": "standard"}}, 5
        else:
            config = {"retries": {"max_attempts": 1, "mode": "standard"},
                      "connect_timeout": timeout / 2, "read_timeout": timeout / 2}
            retries = 1
        fs = s3fs.S3FileSystem(endpoint_url=url, skip_instance_cache=True,
                               use_listings_cache=False, config_kwargs=config)
        fs.retries = retries  # s3fs's own retry loop, around botocore's
        _CLIENTS[key] = fs
    return _CLIENTS[key]


def status(e: BaseException) -> int | None:
    """The HTTP status of the S3 error behind an exception s3fs raised (it translates
    botocore's ClientError and keeps it as the cause), or None."""
    while e is not None:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        e = e.__cause__ or e.__context__
    return None


class S3Store(Store):
    def get_fs(self, uri: str, timeout: float | None = None):
        return client(timeout), uri[len(PREFIX):]

    def write_bytes(self, uri, data, timeout=None):
        fs, path = self.get_fs(uri, timeout)
        fs.pipe_file(path, data)

    def upload_file(self, local, uri):
        fs, path = self.get_fs(uri)
        fs.put_file(local, path)

    def open_ranged(self, uri):
        """One ranged GET per read."""
        fs, path = self.get_fs(uri)
        return fs.open(path, "rb", cache_type="none")

    def copy(self, src, dst):
        """A server-side copy (multipart for large objects)."""
        fs, spath = self.get_fs(src)
        fs.copy(spath, self.get_fs(dst)[1])

    def pyarrow_fs(self, uri):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = self.get_fs(uri)
        return PyFileSystem(FSSpecHandler(fs)), path

    def read_tagged(self, uri, timeout=None):
        """The tag is the ETag. The content and the tag come from two requests; a single
        PUT's ETag is the MD5 of its content, so a pair that does not match (the object
        changed in between) is read again."""
        fs, path = self.get_fs(uri, timeout)
        for _ in range(5):
            try:
                tag = fs.info(path, refresh=True)["ETag"]
                data = fs.cat_file(path)
            except FileNotFoundError:
                return None, None
            if hashlib.md5(data).hexdigest() == tag.strip('"'):
                return data, tag
        return data, tag  # multipart ETags are no MD5: the last pair read

    def _put(self, uri: str, data: bytes, timeout: float | None, **condition) -> str:
        """One conditional PUT. A precondition failure is told by its status: 412, or 409 (a
        concurrent conditional write; retried). A 412 may also answer botocore's retry of a
        PUT that succeeded but whose response was lost: the object is read back, and if it
        holds exactly these bytes (which carry a unique token) the write was ours."""
        fs, path = self.get_fs(uri, timeout)
        bucket, key = path.split("/", 1)
        attempt = 0
        while True:
            try:
                return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                  **condition)["ETag"]
            except OSError as e:
                code = status(e)
                if code == 409 and attempt < 3:
                    time.sleep(0.1 * 2 ** attempt)
                    attempt += 1
                    continue
                if code not in (409, 412):
                    raise
                held, tag = self.read_tagged(uri, timeout)
                if held == data:
                    return tag
                raise Conflict(uri) from None

    def create_exclusive(self, uri, data, timeout=None):
        return self._put(uri, data, timeout, IfNoneMatch="*")

    def replace_if(self, uri, data, tag, timeout=None):
        return self._put(uri, data, timeout, IfMatch=tag)

    def delete_if(self, uri, tag, timeout=None):
        """S3's DELETE takes no If-Match everywhere: the tag is compared just before an
        unconditional delete."""
        if self.read_tagged(uri, timeout)[1] != tag:
            return False
        fs, path = self.get_fs(uri, timeout)
        fs.rm(path)
        return True


def check_uri(uri: str, what: str, folder: bool = False) -> None:
    """Refuses an s3:// URI with no bucket, and (folder=True, an output) one with a bucket but
    no prefix: a run writes a lease, stages and versions beside each other, which a bucket's
    root shares with everything else in it."""
    bucket, _, prefix = uri[len(PREFIX):].strip("/").partition("/")
    if not bucket:
        raise InputError(f"{what}: {uri!r} names no bucket; give s3://BUCKET/PREFIX")
    if folder and not prefix:
        raise InputError(f"{what}: {uri!r} is a whole bucket; give a prefix inside it, e.g. "
                         f"s3://{bucket}/runs/NAME")


def check_reachable(uri: str, what: str, timeout: float) -> None:
    """Raises ValueError within about `timeout` seconds, naming the URI and what failed, when
    the bucket cannot be used: the endpoint is down, the credentials are refused, or the
    bucket does not exist. (The ordinary client retries such errors for minutes.)"""
    bucket = uri[len(PREFIX):].split("/", 1)[0]
    try:
        client(timeout).call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except Exception as e:  # noqa: BLE001 - every failure here becomes the user's message
        code = status(e)
        if code == 404:
            why = f"the bucket {bucket!r} does not exist"
        elif code in (401, 403):
            why = (f"access to the bucket {bucket!r} was refused ({e}); check the AWS "
                   "credentials in the environment")
        elif code is None:
            why = (f"the endpoint {endpoint() or 'AWS S3'} cannot be reached "
                   f"({type(e).__name__}: {e})")
        else:
            why = f"S3 answered {code} ({e})"
        raise InputError(f"{what}: {uri}: {why}") from None


def check_conditional_writes(store: S3Store, folder: str) -> None:
    """Raises RuntimeError unless the store behind `folder` refuses a second If-None-Match: *
    create and an If-Match on a stale ETag, as the lease and the pointer need. Tried on a
    scratch key, deleted after."""
    uri = folder.rstrip("/") + f"/_probe-{uuid.uuid4().hex}"
    try:
        store.create_exclusive(uri, b"first")
        stale = '"' + "0" * 32 + '"'
        for what, attempt in (("If-None-Match: *", lambda: store.create_exclusive(uri, b"2")),
                              ("If-Match", lambda: store.replace_if(uri, b"3", stale))):
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
        store.delete(uri)
