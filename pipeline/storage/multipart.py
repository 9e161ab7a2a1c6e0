"""Joining S3 objects into one without downloading them: a multipart upload whose parts are
server-side copies of the sources (UploadPartCopy)."""
from __future__ import annotations

# S3 multipart limits: every part but the last is at least 5 MiB, none above 5 GiB.
MIN_PART, MAX_PART = 5 << 20, 5 << 30


def concat(fs, srcs: list[str], dst: str) -> dict:
    """Writes the object `dst` as the objects `srcs` one after another (paths without the
    scheme, on the s3fs filesystem `fs`). Sources smaller than MIN_PART are joined here first:
    at most MIN_PART bytes a part pass through this process. Returns {"server_side": bytes
    copied by the store, "through_here": bytes read here}."""
    bucket, key = dst.split("/", 1)
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
        for src in srcs:
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
    fs.invalidate_cache(dst)
    return stats
