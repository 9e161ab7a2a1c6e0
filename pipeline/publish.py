"""Versioned, atomic publishing of finished runs.

Layout under the output URI:
  versions/<version>/index/index.{index,ivfdata}     the distilled on-disk index (one part;
                                                     P parts: index.<p>.{index,ivfdata})
  versions/<version>/baseline/index.{index,ivfdata}  the faiss k-means baseline (build.baseline)
  versions/<version>/{index,baseline}/fastscan.index with build.fastscan: each part as faiss
                                                     IndexIVFPQFastScan (fastscan.<p>.index)
  versions/<version>/report.*, config.json           the evaluation and the resolved config
  versions/<version>/manifest.json                   written last: the version is complete
  manifest.json                                      the pointer: a copy of the current
                                                     version's manifest
  _history.json                                      when each version stopped being
                                                     current (for pruning)

A version folder is never changed once written. The pointer is replaced in one conditional
write (S3: a PUT with If-Match on the pointer this job read; locally a rename under a lock)
only after every file of the new version was read back and matched its size and sha256, so a
reader that resolves the pointer once sees one whole version, old or new. Locally, every file
of the version and its folders reach the disk before the pointer is renamed, and the pointer's
folder after.

A manifest is data from storage: every name in it must lie under its own version's folder
(`checked`), so a planted manifest cannot make a reader open, or a copy write, anything else.

Pruning keeps the current version, the one it replaced, the `keep` versions that were current
most recently, and any version that stopped being current less than `grace` seconds ago (a
reader that resolved the pointer just before it moved is still reading it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time

from pipeline import storage
from pipeline.errors import InputError
from pipeline.index import ondisk

log = logging.getLogger("ivf_distill.publish")

POINTER = "manifest.json"
VERSIONS = "versions"
HISTORY = "_history.json"
HISTORY_LIMIT = 200  # entries kept in _history.json
VERSION_RE = re.compile(r"^\d{8}T\d{6}(\.\d{6})?Z-[0-9a-f]{8}$")
# The manifest fields that name files, beside its "files" table: each index's parts (headers,
# in list order) and, for a one-part index, its pair by the names plain faiss users open.
NAMED = ("index", "ivfdata", "baseline_index", "fastscan_index", "id_map")
ID_MAP = "ids.parquet"  # string corpus ids: (index_id int64, id string), beside the index
NAMED_LISTS = ("index_parts", "baseline_parts", "fastscan_parts")
ONE_PART = {"index": "index", "baseline": "baseline_index"}


def is_version(name: str) -> bool:
    return bool(VERSION_RE.match(name))


def checked(manifest: dict, where: str) -> dict:
    """The manifest, after checking that every name it gives for a file is a plain relative
    path under versions/<its version>/: no "..", no absolute path, no scheme. Raises
    ValueError naming the offending entry."""
    version = manifest.get("version")
    if not isinstance(version, str) or not is_version(version):
        raise InputError(f"{where}: the manifest's version {version!r} is not a version name")
    prefix = f"{VERSIONS}/{version}/"
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise InputError(f"{where}: the manifest has no files table")
    names = list(files) + [manifest[k] for k in NAMED if k in manifest]
    for k in NAMED_LISTS:
        if k in manifest:
            if not isinstance(manifest[k], list):
                raise InputError(f"{where}: the manifest's {k} is not a list of files")
            names += manifest[k]
    for rel in names:
        if not (isinstance(rel, str) and rel.startswith(prefix) and "\\" not in rel
                and ":" not in rel and posixpath.normpath(rel) == rel
                and ".." not in rel.split("/")):
            raise InputError(f"{where}: the manifest names {rel!r}, which is not a file "
                             f"under {prefix}; refusing to use it")
    return manifest


def read_pointer(output: str) -> tuple[dict | None, str | None]:
    """(the current manifest, checked, and its tag for a conditional replace), or (None,
    None)."""
    raw, tag = storage.read_tagged(storage.join(output, POINTER))
    if raw is None:
        return None, None
    return checked(json.loads(raw), storage.join(output, POINTER)), tag


def resolve(output: str) -> dict:
    """The published manifest of `output`, for readers. Raises ValueError if none."""
    manifest, _ = read_pointer(output)
    if manifest is None:
        raise InputError(f"{output} has no {POINTER}: nothing is published there yet")
    return manifest


def version_name(keys: dict) -> str:
    """Sortable: a UTC timestamp, then a short hash of what the version was built from."""
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]
    now = time.time()  # microseconds: two publishes within one second still sort in order
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{digest}"


def _put_index(src_folder: str, src_files: dict, dst_folder: str, held) -> dict:
    """Places a merged index (its parts and their fast-scan exports) into a version folder;
    returns {name: {sha256, bytes}} of what must now be there. src_files: {name: {sha256,
    bytes}} as the merge wrote them. Data files go first, then the headers that name them.
    S3 headers record the bare .ivfdata name and are copied on the server; a local header is
    rewritten to record its own version's absolute .ivfdata path, so that plain
    faiss.read_index(path) opens it."""
    headers = sorted(n for n in src_files if ondisk.HEADER_RE.match(n))
    copied = [n for n in sorted(src_files) if n not in headers]
    if storage.is_s3(dst_folder):
        copied += headers
    want = {}
    for name in copied:
        held.check(held.timeout)
        storage.copy(storage.join(src_folder, name), storage.join(dst_folder, name))
        want[name] = src_files[name]
    if not storage.is_s3(dst_folder):
        dst = storage.get_fs(dst_folder)[1]
        for name in headers:
            held.check(held.timeout)
            header = os.path.join(dst, name)
            ondisk.retarget(os.path.join(storage.get_fs(src_folder)[1], name),
                            os.path.join(dst, ondisk.data_file(name)), header)
            want[name] = {"sha256": storage.sha256_file(header), "bytes": os.path.getsize(header)}
    return want


def _meta(uri: str) -> dict:
    return {"sha256": storage.sha256_uri(uri), "bytes": storage.size(uri)}


def verify(output: str, files: dict, read: bool = True) -> None:
    """Every file of a manifest is there, with its size and, if `read`, its sha256 (each file
    is read whole). Raises RuntimeError."""
    for rel, want in files.items():
        uri = storage.join(output, rel)
        if not storage.exists(uri):
            raise RuntimeError(f"{uri} is missing")
        got = _meta(uri) if read else {"sha256": want["sha256"], "bytes": storage.size(uri)}
        if got != want:
            raise RuntimeError(f"{uri}: {got} where {want} was written")


def publish(output: str, indexes: dict, extra: dict, meta: dict, keys: dict, held,
            keep: int, grace: float, fresh: bool = True) -> dict:
    """Publishes a new version and points the manifest at it; returns the manifest.

    indexes: {folder in the version: (folder holding a merged index, {name: {sha256, bytes}}
    of its files, its part headers, its fast-scan exports)}; its "index" entry is the
    distilled index. extra: {file name:
    bytes} (report, config). meta: more manifest fields. keys: the stage keys the version
    was built from; unless `fresh` (something was rebuilt), nothing is published when the
    current version was built from the same keys. held: the output's lease; every write is
    made under it. keep, grace: see prune.
    """
    current, tag = read_pointer(output)
    if not fresh and current is not None and current.get("stage_keys") == keys:
        log.info("publish: nothing changed; the current version is %s", current["version"])
        return current
    version = version_name(keys)
    vrel = f"{VERSIONS}/{version}"
    vdir = storage.join(output, vrel)
    files = {}
    for folder, (src, src_files, _, _) in indexes.items():
        placed = _put_index(src, src_files, storage.join(vdir, folder), held)
        files.update({f"{vrel}/{folder}/{n}": m for n, m in placed.items()})
    for name, data in extra.items():
        held.write(storage.join(vdir, name), data)
        files[f"{vrel}/{name}"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}
    # The hashes were taken where each file was written (the merge's part tasks, or here), and
    # every copy above is whole or absent: sizes show that each landed, without reading the
    # index again.
    verify(output, files, read=False)
    manifest = {**meta, "version": version, "previous_version": (current or {}).get("version"),
                "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files, "stage_keys": keys}
    for folder, (_, _, parts, fastscan) in indexes.items():
        names = [f"{vrel}/{folder}/{h}" for h in parts]
        manifest[f"{folder}_parts"] = names
        if len(names) == 1:  # one part: the pair, named as plain faiss users open it
            manifest[ONE_PART[folder]] = names[0]
        if folder == "index" and fastscan:
            manifest["fastscan_parts"] = [f"{vrel}/index/{f}" for f in fastscan]
            if len(fastscan) == 1:
                manifest["fastscan_index"] = manifest["fastscan_parts"][0]
    if "index" in manifest:
        manifest["ivfdata"] = ondisk.data_file(manifest["index"])
    if ID_MAP in extra:
        manifest["id_map"] = f"{vrel}/{ID_MAP}"
    data = storage.json_bytes(manifest)
    held.write(storage.join(vdir, POINTER), data)  # the version is complete
    swap(output, data, tag, version, (current or {}).get("version"), held)
    log.info("publish: %s is now the current version (%s)", version, storage.join(output, POINTER))
    prune(output, keep, grace, held)
    return manifest


def _history(output: str) -> list[dict]:
    """[{"version", "until"}] oldest first: when each version stopped being current (until
    None: it is current, or was made current by a swap that may not have happened)."""
    uri = storage.join(output, HISTORY)
    return storage.read_json(uri) if storage.exists(uri) else []


def swap(output: str, data: bytes, tag: str | None, version: str, was: str | None,
         held) -> None:
    """Points `output` at `version` (its manifest bytes `data`), replacing the pointer only
    if it still has `tag`, and records in the history that `was` stopped being current now.
    The history is written first: a crash between the two leaves a version kept longer,
    never one deleted early. A local version's files and folders reach the disk first."""
    storage.sync_tree(storage.join(output, VERSIONS, version))
    now = time.time()
    history = [h for h in _history(output) if h["version"] != version]
    for h in history:  # every other version stops being current now
        if h["until"] is None:
            h["until"] = now
    if was and not any(h["version"] == was for h in history):
        history.append({"version": was, "until": now})
    history.append({"version": version, "until": None})
    held.write(storage.join(output, HISTORY), storage.json_bytes(history[-HISTORY_LIMIT:]))
    held.check(held.timeout)
    try:
        storage.replace_if(storage.join(output, POINTER), data, tag, held.timeout)
    except storage.Conflict:
        raise RuntimeError(f"{storage.join(output, POINTER)} changed while this job ran: "
                           "another writer published; rerun to publish over it") from None


def versions(output: str) -> list[str]:
    """Complete versions (their manifest written), oldest first."""
    root = storage.join(output, VERSIONS)
    return [v for v in storage.listdir(root)
            if is_version(v) and storage.exists(storage.join(root, v, POINTER))]


def rollback(output: str, version: str, held) -> dict:
    """Points the manifest at an earlier complete version, after checking its files."""
    have = versions(output)
    if version not in have:
        raise InputError(f"--rollback: {output} has no complete version {version!r}; it has: "
                         f"{', '.join(have) or 'none'}")
    uri = storage.join(output, VERSIONS, version, POINTER)
    data = storage.read_bytes(uri)
    manifest = checked(json.loads(data), uri)
    if manifest["version"] != version:
        raise InputError(f"--rollback: {uri} describes version {manifest['version']!r}; the "
                         "version is damaged")
    try:
        verify(output, manifest["files"])
    except RuntimeError as e:
        raise InputError(f"--rollback: version {version} is damaged ({e}); the manifest "
                         "still points where it did") from None
    current, tag = read_pointer(output)
    swap(output, data, tag, version, (current or {}).get("version"), held)
    log.info("rollback: %s is the current version again", version)
    return manifest


def prune(output: str, keep: int, grace: float, held) -> list[str]:
    """Deletes the versions that no reader may still hold, and any incomplete version folder
    (a publish that died before its manifest); returns what it deleted. Kept: the current
    version and the one it replaced; the `keep` versions that were current most recently;
    any version that stopped being current less than `grace` seconds ago. A version that
    never became current counts as current longest ago."""
    current = (read_pointer(output)[0] or {}).get("version")
    history = _history(output)
    now = time.time()
    last = {}  # version -> when it stopped being current (inf: it is, or may be, current)
    for h in history:
        last[h["version"]] = float("inf") if h["until"] is None else h["until"]
    last[current] = float("inf")
    ended = sorted((h for h in history if h["until"] is not None), key=lambda h: h["until"])
    replaced = ended[-1]["version"] if ended else None
    complete = versions(output)
    by_recency = sorted(complete, key=lambda v: last.get(v, float("-inf")), reverse=True)
    kept = set(by_recency[:keep]) | {current, replaced}
    kept |= {v for v in complete if now - last.get(v, float("-inf")) < grace}
    root = storage.join(output, VERSIONS)
    deleted = []
    for v in storage.listdir(root):
        if v not in kept:
            held.check(held.timeout)
            storage.delete(storage.join(root, v))
            deleted.append(v)
            log.info("publish: deleted old version %s", v)
    return deleted
