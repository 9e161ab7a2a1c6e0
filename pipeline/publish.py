"""Versioned, atomic publishing of finished runs.

Layout under the output URI:
  versions/<version>/index/index.{index,ivfdata}     the distilled on-disk index
  versions/<version>/baseline/index.{index,ivfdata}  the faiss k-means baseline
  versions/<version>/{index,baseline}/fastscan.index with build.fastscan: each as faiss
                                                     IndexIVFPQFastScan (one plain file)
  versions/<version>/report.*, config.json           the evaluation and the resolved config
  versions/<version>/manifest.json                   written last: the version is complete
  manifest.json                                      the pointer: a copy of the current
                                                     version's manifest

A version folder is never changed once written. The pointer is replaced in one conditional
write (S3: a PUT with If-Match on the pointer this job read; locally a rename under a lock)
only after every file of the new version was read back and matched its size and sha256, so a
reader that resolves the pointer once sees one whole version, old or new.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from pipeline import storage
from pipeline.index import ondisk

log = logging.getLogger("pipeline.publish")

POINTER = "manifest.json"
VERSIONS = "versions"
INDEX_FILES = ("index.ivfdata", "index.index")  # in this order: data before its header
FASTSCAN = ondisk.FASTSCAN


def read_pointer(output: str) -> tuple[dict | None, str | None]:
    """(the current manifest, its tag for a conditional replace), or (None, None)."""
    raw, tag = storage.read_tagged(storage.join(output, POINTER))
    return (json.loads(raw), tag) if raw is not None else (None, None)


def resolve(output: str) -> dict:
    """The published manifest of `output`, for readers. Raises ValueError if none."""
    manifest, _ = read_pointer(output)
    if manifest is None:
        raise ValueError(f"{output} has no {POINTER}: nothing is published there yet")
    return manifest


def version_name(keys: dict) -> str:
    """Sortable: a UTC timestamp, then a short hash of what the version was built from."""
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]
    now = time.time()  # microseconds: two publishes within one second still sort in order
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{digest}"


def _put_index(src_folder: str, src_files: dict, dst_folder: str) -> dict:
    """Places a merged index pair into a version folder; returns {name: {sha256, bytes}} of
    what must now be there. src_files: the pair's {name: {sha256, bytes}} as merged. S3 pairs
    record the bare .ivfdata name and are copied on the server; a local .index is rewritten
    to record its own version's absolute .ivfdata path, so that plain faiss.read_index(path)
    opens it."""
    want = {name: src_files[name] for name in INDEX_FILES}
    if FASTSCAN in src_files:  # self-contained: copied as it is
        storage.copy(storage.join(src_folder, FASTSCAN), storage.join(dst_folder, FASTSCAN))
        want[FASTSCAN] = src_files[FASTSCAN]
    storage.copy(storage.join(src_folder, INDEX_FILES[0]), storage.join(dst_folder,
                                                                        INDEX_FILES[0]))
    if storage.is_s3(dst_folder):
        storage.copy(storage.join(src_folder, INDEX_FILES[1]),
                     storage.join(dst_folder, INDEX_FILES[1]))
    else:
        dst = storage.get_fs(dst_folder)[1]
        header = os.path.join(dst, INDEX_FILES[1])
        ondisk.retarget(os.path.join(storage.get_fs(src_folder)[1], INDEX_FILES[1]),
                        os.path.join(dst, INDEX_FILES[0]), header)
        want[INDEX_FILES[1]] = {"sha256": storage.sha256_file(header),
                                "bytes": os.path.getsize(header)}
    return want


def _meta(uri: str) -> dict:
    return {"sha256": storage.sha256_uri(uri), "bytes": storage.size(uri)}


def verify(output: str, files: dict) -> None:
    """Every file of a manifest is there, with its size and sha256. Raises RuntimeError."""
    for rel, want in files.items():
        uri = storage.join(output, rel)
        if not storage.exists(uri):
            raise RuntimeError(f"{uri} is missing")
        got = _meta(uri)
        if got != want:
            raise RuntimeError(f"{uri}: {got} where {want} was written")


def publish(output: str, indexes: dict, extra: dict, meta: dict, keys: dict, keep: int,
            check=lambda: None, fresh: bool = True) -> dict:
    """Publishes a new version and points the manifest at it; returns the manifest.

    indexes: {folder in the version: (folder holding a merged index pair, {name: {sha256,
    bytes}} of the pair)}; its "index" entry is the distilled index. extra: {file name:
    bytes} (report, config). meta: more manifest fields. keys: the stage keys the version
    was built from; unless `fresh` (something was rebuilt), nothing is published when the
    current version was built from the same keys. check() runs just before the pointer
    moves (the lease's check). Keeps the newest `keep` versions and the current one.
    """
    current, tag = read_pointer(output)
    if not fresh and current is not None and current.get("stage_keys") == keys:
        log.info("publish: nothing changed; the current version is %s", current["version"])
        return current
    version = version_name(keys)
    vrel = f"{VERSIONS}/{version}"
    vdir = storage.join(output, vrel)
    files = {}
    for folder, (src, src_files) in indexes.items():
        placed = _put_index(src, src_files, storage.join(vdir, folder))
        files.update({f"{vrel}/{folder}/{n}": m for n, m in placed.items()})
    for name, data in extra.items():
        storage.write_bytes(storage.join(vdir, name), data)
        files[f"{vrel}/{name}"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}
    verify(output, files)
    manifest = {**meta, "version": version, "previous_version": (current or {}).get("version"),
                "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "index": f"{vrel}/index/index.index", "ivfdata": f"{vrel}/index/index.ivfdata",
                "baseline_index": f"{vrel}/baseline/index.index", "files": files,
                "stage_keys": keys}
    if f"{vrel}/index/{FASTSCAN}" in files:
        manifest["fastscan_index"] = f"{vrel}/index/{FASTSCAN}"
    data = storage.json_bytes(manifest)
    storage.write_bytes(storage.join(vdir, POINTER), data)  # the version is complete
    check()
    _swap_pointer(output, data, tag)
    log.info("publish: %s is now the current version (%s)", version, storage.join(output, POINTER))
    prune(output, keep, version)
    return manifest


def _swap_pointer(output: str, data: bytes, tag: str | None) -> None:
    try:
        storage.replace_if(storage.join(output, POINTER), data, tag)
    except storage.Conflict:
        raise RuntimeError(f"{storage.join(output, POINTER)} changed while this job ran: "
                           "another writer published; rerun to publish over it") from None


def versions(output: str) -> list[str]:
    """Complete versions (their manifest written), oldest first."""
    root = storage.join(output, VERSIONS)
    return [v for v in storage.listdir(root)
            if storage.exists(storage.join(root, v, POINTER))]


def rollback(output: str, version: str) -> dict:
    """Points the manifest at an earlier complete version, after checking its files."""
    uri = storage.join(output, VERSIONS, version, POINTER)
    if not storage.exists(uri):
        have = versions(output)
        raise ValueError(f"--rollback: {output} has no complete version {version!r}; it has: "
                         f"{', '.join(have) or 'none'}")
    data = storage.read_bytes(uri)
    manifest = json.loads(data)
    try:
        verify(output, manifest["files"])
    except RuntimeError as e:
        raise ValueError(f"--rollback: version {version} is damaged ({e}); the manifest "
                         "still points where it did") from None
    _, tag = read_pointer(output)
    _swap_pointer(output, data, tag)
    log.info("rollback: %s is the current version again", version)
    return manifest


def prune(output: str, keep: int, current: str) -> None:
    """Deletes all versions but the newest `keep` complete ones and `current`, and any
    incomplete version folder (a publish that died before its manifest)."""
    root = storage.join(output, VERSIONS)
    complete = versions(output)
    keep_set = set(complete[-keep:]) | {current}
    for v in storage.listdir(root):
        if v not in keep_set:
            storage.delete(storage.join(root, v))
            log.info("publish: deleted old version %s", v)
