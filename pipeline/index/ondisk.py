"""Per-shard encoding and the merge of shard indexes into one OnDiskInvertedLists index."""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

import faiss
import numpy as np

# A merged on-disk index: the header faiss reads, and its inverted lists' data file.
PAIR = ("index.index", "index.ivfdata")
# With build.fastscan, beside the pair: the same index as IndexIVFPQFastScan, self-contained
# (faiss holds fast-scan lists in memory only).
FASTSCAN = "fastscan.index"


def encode_shard(trained, ids: np.ndarray, x: np.ndarray, use_gpu: bool = False):
    """A copy of the trained empty index holding x under its global ids.

    use_gpu encodes on GPU 0 with faiss-gpu when this faiss has GPUs (the codes are the same
    up to float rounding ties); otherwise, and with faiss-cpu, on the CPU.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = ids.astype(np.int64)
    if use_gpu and gpu_count() > 0:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, trained)
        index.add_with_ids(x, ids)
        return faiss.index_gpu_to_cpu(index)
    index = faiss.clone_index(trained)
    index.add_with_ids(x, ids)
    return index


def gpu_count() -> int:
    """GPUs this faiss can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def merge_ondisk(trained, shard_paths: list[str], out_dir: str,
                 name: str = "index", stored_ivfdata: str | None = None) -> tuple[str, str, int]:
    """Merges shard index files into `out_dir/{name}.index` + `{name}.ivfdata` in one process.

    `stored_ivfdata` is the .ivfdata path recorded inside the .index file (default: its path
    in out_dir). Readers that move the pair elsewhere open it with IO_FLAG_ONDISK_SAME_DIR.
    Returns (index path, ivfdata path, ntotal). The reference for the list-range merge.
    """
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.ntotal == 0, "the trained index must be empty"
    shards, invlists, expected = [], [], 0
    for p in shard_paths:
        s = faiss.read_index(p, faiss.IO_FLAG_MMAP)
        s_ivf = faiss.extract_index_ivf(s)
        assert s_ivf.nlist == ivf.nlist and s_ivf.code_size == ivf.code_size, \
            f"{p} was not encoded with this trained index"
        expected += s_ivf.ntotal
        shards.append(s)  # keep the mmapped indexes alive while their lists are read
        invlists.append(s_ivf.invlists)
    ivfdata = os.path.join(out_dir, f"{name}.ivfdata")
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    ntotal = _merge_into(ondisk, invlists)
    assert ntotal == expected, f"merged {ntotal} vectors, shards hold {expected}"
    return _write_ondisk_index(index, ondisk, ntotal, out_dir, name, stored_ivfdata)


def _merge_into(ondisk, invlists: list) -> int:
    vec = faiss.InvertedListsPtrVector()
    for il in invlists:
        vec.push_back(il)
    return ondisk.merge_from_multiple(vec.data(), vec.size(), False, False)


def _write_ondisk_index(index, ondisk, ntotal: int, out_dir: str, name: str,
                        stored_ivfdata: str | None):
    ivf = faiss.extract_index_ivf(index)
    ivf.ntotal = index.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    if stored_ivfdata is not None:
        ondisk.filename = stored_ivfdata
    index_path = os.path.join(out_dir, f"{name}.index")
    faiss.write_index(index, index_path)
    return index_path, os.path.join(out_dir, f"{name}.ivfdata"), ntotal


# The list-range ("hslice") merge, after faiss's benchs/distributed_ondisk: each encoded shard
# is one list-major file; one task per list range reads that range of every shard (ranged
# reads) into its own slice file; a last step concatenates the slices. The slices use the
# layout of OnDiskInvertedLists.merge_from_multiple (lists in order, exact capacities), so
# concatenated they are byte for byte the file a single merge writes, and the final metadata
# follows from the list sizes alone.

def list_ranges(nlist: int, n_ranges: int) -> list[tuple[int, int]]:
    """[l0, l1) ranges covering 0..nlist, as even as possible, none empty."""
    n_ranges = max(1, min(n_ranges, nlist))
    cuts = np.linspace(0, nlist, n_ranges + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


# An encoded shard's inverted lists in one file, list-major, so that any list range is three
# ranged reads: header (magic, nlist, code_size, ntotal: int64), cum (nlist + 1) int64 running
# list sizes, ids (ntotal) int64, codes (ntotal, code_size) uint8.
_MAGIC = 0x4C49515621  # "!VQIL"
_HEAD = 4 * 8


def write_lists(index, f) -> int:
    """Writes the inverted lists of an encoded IVF index to the binary file object f."""
    il = faiss.extract_index_ivf(index).invlists
    nlist, cs = il.nlist, il.code_size
    sizes = np.array([il.list_size(j) for j in range(nlist)], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    f.write(np.array([_MAGIC, nlist, cs, cum[-1]], dtype=np.int64).tobytes())
    f.write(cum.tobytes())
    nonempty = np.flatnonzero(sizes)
    for j in nonempty:
        f.write(faiss.rev_swig_ptr(il.get_ids(int(j)), int(sizes[j])).tobytes())
    for j in nonempty:
        f.write(faiss.rev_swig_ptr(il.get_codes(int(j)), int(sizes[j]) * cs).tobytes())
    return int(cum[-1])


def _read_at(f, offset: int, nbytes: int, dtype) -> np.ndarray:
    f.seek(offset)
    raw = f.read(nbytes)
    assert len(raw) == nbytes, "encoded shard file is truncated"
    return np.frombuffer(raw, dtype=dtype)


def read_range_sizes(f, l0: int, l1: int) -> tuple[np.ndarray, dict]:
    """Sizes of lists l0..l1 of an encoded shard file, and where its entries lie."""
    magic, nlist, cs, ntotal = _read_at(f, 0, _HEAD, np.int64).tolist()
    assert magic == _MAGIC and l1 <= nlist, "not an encoded shard file, or another nlist"
    cum = _read_at(f, _HEAD + 8 * l0, 8 * (l1 - l0 + 1), np.int64)
    where = {"start": int(cum[0]), "n": int(cum[-1] - cum[0]), "cs": cs,
             "ids_at": _HEAD + 8 * (nlist + 1), "codes_at": _HEAD + 8 * (nlist + 1) + 8 * ntotal}
    return np.diff(cum), where


def read_range_entries(f, where: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), codes (n * code_size,)) of a list range, from read_range_sizes's `where`."""
    start, n, cs = where["start"], where["n"], where["cs"]
    ids = _read_at(f, where["ids_at"] + 8 * start, 8 * n, np.int64)
    codes = _read_at(f, where["codes_at"] + cs * start, cs * n, np.uint8)
    return ids, codes


def merge_range(open_shards: list, l0: int, l1: int, out_ivfdata: str) -> np.ndarray:
    """Merges lists l0..l1 of every encoded shard into the slice file `out_ivfdata`, in the
    layout OnDiskInvertedLists.merge_from_multiple gives them (per list, codes then ids, exact
    capacity; shards in order within a list). One shard's range is in memory at a time, and
    the output is written with pwrite, not mapped, so memory stays flat however big the range.

    open_shards: callables, each returning a binary file object of one encoded shard.
    Returns the range's list sizes (l1 - l0,) int64.
    """
    per_shard = []
    for opener in open_shards:
        with opener() as f:
            per_shard.append(read_range_sizes(f, l0, l1))
    sizes = np.stack([s for s, _ in per_shard])  # (shards, lists)
    cs = per_shard[0][1]["cs"]
    cap = sizes.sum(0)
    offset = np.concatenate([[0], np.cumsum(cap * (cs + 8))])
    before = np.cumsum(sizes, axis=0) - sizes  # entries of earlier shards in each list
    fd = os.open(out_ivfdata, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.ftruncate(fd, int(offset[-1]))
        for s, opener in enumerate(open_shards):
            with opener() as f:
                ids, codes = read_range_entries(f, per_shard[s][1])
            pos = 0
            for j in np.flatnonzero(sizes[s]).tolist():
                n, k = int(sizes[s, j]), int(before[s, j])
                code_at = int(offset[j]) + k * cs
                id_at = int(offset[j]) + int(cap[j]) * cs + 8 * k
                os.pwrite(fd, codes[pos * cs:(pos + n) * cs].tobytes(), code_at)
                os.pwrite(fd, ids[pos:pos + n].tobytes(), id_at)
                pos += n
    finally:
        os.close(fd)
    return cap.astype(np.int64)


def lists_index(trained, sizes: np.ndarray, out_dir: str, name: str = "index",
                stored_ivfdata: str | None = None):
    """Writes `{name}.index`, mapping an `{name}.ivfdata` that holds the inverted lists in list
    order with exact capacities (the slices of merge_range, concatenated), without reading
    it: the layout follows from the list sizes alone. Returns (index path, the .ivfdata's
    size in bytes, ntotal)."""
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.ntotal == 0, "the trained index must be empty"
    assert len(sizes) == ivf.nlist, "one size per inverted list"
    entry = ivf.code_size + 8  # codes plus one int64 id per vector
    offsets = np.concatenate([[0], np.cumsum(sizes * entry)])
    # update_totsize sets the size and free-slot bookkeeping exactly as a single merge does,
    # but it starts by truncating its file: point it at a sparse placeholder, then at the
    # data's name.
    placeholder = os.path.join(out_dir, f"{name}.ivfdata.placeholder")
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, placeholder)
    with silenced():
        ondisk.update_totsize(int(offsets[-1]))
    ondisk.filename = os.path.join(out_dir, f"{name}.ivfdata")
    lists = faiss.OnDiskOneListVector()
    for j, n in enumerate(sizes.tolist()):
        one = faiss.OnDiskOneList()
        one.size = one.capacity = n
        one.offset = int(offsets[j])
        lists.push_back(one)
    ondisk.lists = lists
    index_path, _, ntotal = _write_ondisk_index(index, ondisk, int(sizes.sum()), out_dir, name,
                                                stored_ivfdata)
    del index  # unmaps the placeholder
    os.remove(placeholder)
    return index_path, int(offsets[-1]), ntotal


_stdout_lock = threading.Lock()


@contextmanager
def _stdout_to(fd: int):
    """Points fd 1 at `fd` for the block: what C++ code prints to stdout goes there."""
    with _stdout_lock:  # fd 1 is process-wide: one redirect at a time
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(fd, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


@contextmanager
def stdout_to_stderr():
    """Sends what C++ code prints to stdout (faiss's "IO_FLAG_ONDISK_SAME_DIR: updating ondisk
    filename" line) to stderr instead, so that a program's stdout holds only its results."""
    with _stdout_to(2):
        yield


@contextmanager
def silenced():
    """Drops what C++ code prints to stdout: for faiss's notes on files this module renames
    on purpose (a placeholder resized, a data file re-pointed)."""
    with open(os.devnull, "wb") as devnull, _stdout_to(devnull.fileno()):
        yield


def read_ondisk(index_path: str):
    """Opens a published pair wherever it lies (the .ivfdata beside the .index)."""
    # Not IO_FLAG_MMAP: it carries IO_FLAG_SKIP_IVF_DATA, which leaves an OnDisk index unmapped
    # (search then segfaults, faiss 1.15).
    with stdout_to_stderr():
        return faiss.read_index(index_path,
                                faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)


def retarget(index_path: str, ivfdata_path: str, out_path: str) -> None:
    """Writes to out_path a copy of the on-disk .index at index_path (its .ivfdata beside it)
    that records `ivfdata_path` as its data file. Only the small header is rewritten."""
    with silenced():
        index = faiss.read_index(index_path,
                                 faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(invlists, faiss.OnDiskInvertedLists), f"{index_path} is not on-disk"
    invlists.filename = ivfdata_path
    tmp = out_path + ".tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, out_path)
