"""Opening a published index to search it: plain faiss, numpy, pyarrow and s3fs, no torch,
no Ray, no YAML, so a search server installs only those.

    from pipeline.reader import open_index
    index = open_index("s3://bucket/runs/r1")        # the version manifest.json names
    scores, ids = index.search(queries, k=10, nprobe=32)

A run folder resolves through its manifest once, so every file read belongs to one version.
Files on S3 are copied to a local cache folder (versions never change, so a file already
there at its published size is not fetched again). A version built from string ids returns
them: `ids` is then an object array of the user's ids, with None where a query found fewer
than k vectors.
"""
from __future__ import annotations

import hashlib
import os

import faiss
import numpy as np

from pipeline import publish, storage
from pipeline.errors import InputError
from pipeline.index import ondisk

CACHE_ENV = "IVF_DISTILL_CACHE"  # where S3 copies are kept (default ~/.cache/ivf-distill)


def default_cache() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "ivf-distill")


class Index:
    """A published index opened for search: `faiss` is the faiss index (the parts stacked as
    one, or the fast-scan exports joined in memory); `id_map` the user's ids by the int64 id
    the index holds, where the corpus had string ids."""

    def __init__(self, index, id_map: np.ndarray | None = None, version: str | None = None):
        self.faiss = index
        self.id_map = id_map
        self.version = version

    @property
    def d(self) -> int:
        return self.faiss.d

    @property
    def ntotal(self) -> int:
        return self.faiss.ntotal

    @property
    def nlist(self) -> int:
        return faiss.extract_index_ivf(self.faiss).nlist

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int = 16):
        """(scores, ids) of the top k per query, best first, searching `nprobe` lists (at most
        nlist). ids are -1 (None with string ids) where fewer than k were found."""
        xq = np.ascontiguousarray(queries, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.d:
            raise InputError(f"queries must be (n, {self.d}) for this index, got {xq.shape}")
        if not 1 <= k <= self.ntotal:
            raise InputError(f"k must be between 1 and the index's {self.ntotal} vectors, "
                             f"got {k}")
        if nprobe < 1:
            raise InputError(f"nprobe must be >= 1, got {nprobe}")
        faiss.extract_index_ivf(self.faiss).nprobe = min(nprobe, self.nlist)
        D, I = self.faiss.search(xq, k)
        return D, self.user_ids(I)

    def user_ids(self, I: np.ndarray) -> np.ndarray:
        """The user's ids for the index's int64 ids (unchanged without an id map)."""
        if self.id_map is None:
            return I
        out = np.empty(I.shape, dtype=object)
        found = I >= 0
        out[found] = self.id_map[I[found]]
        out[~found] = None
        return out


def index_files(uri: str) -> tuple[str, list[str], list[str], dict | None]:
    """(folder, part headers, fast-scan exports, manifest or None) to open. A run folder is
    resolved through its manifest once; an index folder gives all its parts; one part's
    .index file gives that part alone (one server of a sharded index)."""
    uri = uri.rstrip("/")
    if uri.endswith(".index"):
        folder, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
        part = bool(ondisk.HEADER_RE.match(name))
        return folder, [name] if part else [], [] if part else [name], None
    if storage.exists(storage.join(uri, publish.POINTER)):
        manifest = publish.resolve(uri)
        parts = manifest["index_parts"]
        folder = parts[0].rsplit("/", 1)[0]
        return (storage.join(uri, folder), [p.rsplit("/", 1)[1] for p in parts],
                [p.rsplit("/", 1)[1] for p in manifest.get("fastscan_parts", [])], manifest)
    names = storage.listdir(uri)
    headers = [n for n in names if ondisk.HEADER_RE.match(n)]
    if headers:
        return uri, headers, [n for n in names if ondisk.FASTSCAN_RE.match(n)], None
    raise InputError(f"{uri} holds neither a published run ({publish.POINTER}) nor an index's "
                     "parts (index.index, or index.<p>.index)")


def cached_folder(folder_uri: str, names: list[str], cache: str) -> str:
    """A local folder holding `names` of folder_uri: the folder itself when it is local, else
    a folder under `cache` named by the URI, where a file is fetched unless it is already
    there at its stored size."""
    if not storage.is_s3(folder_uri):
        return os.path.abspath(folder_uri)
    local = os.path.join(cache, hashlib.sha256(folder_uri.encode()).hexdigest()[:24])
    os.makedirs(local, exist_ok=True)
    for name in names:
        uri, path = storage.join(folder_uri, name), os.path.join(local, name)
        if os.path.exists(path) and os.path.getsize(path) == storage.size(uri):
            continue
        storage.download_file(uri, path + ".part")
        os.replace(path + ".part", path)
    return local


def _id_map(uri: str, manifest: dict | None, cache: str) -> np.ndarray | None:
    name = (manifest or {}).get("id_map")
    if not name:
        return None
    import pyarrow.parquet as pq

    folder, file = name.rsplit("/", 1)
    local = cached_folder(storage.join(uri.rstrip("/"), folder), [file], cache)
    table = pq.read_table(os.path.join(local, file))
    index_ids = table.column("index_id").to_numpy()
    out = np.empty(len(index_ids), dtype=object)
    out[index_ids] = table.column("id").to_numpy(zero_copy_only=False)
    return out


def open_index(uri: str, cache: str | None = None, fastscan: bool = False) -> Index:
    """Opens a published run (its current version), an index folder or one part's .index, on
    a local path or s3://, as one Index. fastscan opens the version's fast-scan exports
    (build.fastscan) in memory instead of the on-disk parts."""
    cache = cache or default_cache()
    folder, headers, fastscans, manifest = index_files(uri)
    version = (manifest or {}).get("version")
    id_map = _id_map(uri, manifest, cache)
    if fastscan:
        if not fastscans:
            raise InputError(f"{folder} has no {ondisk.FASTSCAN}; publish with "
                             "--set build.fastscan=true (index.nbits=4)")
        local = cached_folder(folder, fastscans, cache)
        return Index(ondisk.join_fastscan([faiss.read_index(os.path.join(local, f))
                                           for f in fastscans]), id_map, version)
    if not headers:
        raise InputError(f"{uri} is not an on-disk index part (index[.<p>].index)")
    names = [n for h in headers for n in (ondisk.data_file(h), h)]
    local = cached_folder(folder, names, cache)
    return Index(ondisk.open_parts([os.path.join(local, h) for h in headers]), id_map, version)
