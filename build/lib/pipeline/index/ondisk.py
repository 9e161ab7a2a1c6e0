"""Per-shard encoding and the merge of shard indexes into one OnDiskInvertedLists index."""
from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager

import faiss
import numpy as np

from pipeline.errors import InputError
from pipeline.index import gpu

# With build.fastscan, beside the pair: the same index as IndexIVFPQFastScan, self-contained
# (faiss holds fast-scan lists in memory only).
FASTSCAN = "fastscan.index"


def encode_shard(trained, ids: np.ndarray, x: np.ndarray, use_gpu: bool = False):
    """A copy of the trained empty index holding x under its global ids.

    use_gpu encodes on GPU 0 where faiss-gpu can hold the index (pipeline.index.gpu: the
    codes are the same up to float rounding ties); otherwise on the CPU.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    return gpu.encode(trained, ids.astype(np.int64), x, use_gpu)[0]


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


# The index as parts, after faiss's benchs/distributed_ondisk "hslice": part p holds the
# inverted lists of one range [l0, l1) and is a complete, plain faiss index (the trained
# quantizer, every other list empty). One task writes each part from a ranged read of each
# encoded shard, so no step joins the parts into one file, and a part is searched, served or
# converted on its own. One part is the pair index.index + index.ivfdata.

def list_ranges(nlist: int, n_ranges: int) -> list[tuple[int, int]]:
    """[l0, l1) ranges covering 0..nlist, as even as possible, none empty."""
    n_ranges = max(1, min(n_ranges, nlist))
    cuts = np.linspace(0, nlist, n_ranges + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


HEADER_RE = re.compile(r"^index(\.\d{5})?\.index$")  # a part's header file name
FASTSCAN_RE = re.compile(r"^fastscan(\.\d{5})?\.index$")  # a part's fast-scan export


def part_files(p: int, parts: int) -> tuple[str, str]:
    """(header, data) file names of part p of `parts`."""
    stem = "index" if parts == 1 else f"index.{p:05d}"
    return f"{stem}.index", f"{stem}.ivfdata"


def fastscan_file(p: int, parts: int) -> str:
    """The fast-scan export of part p (build.fastscan)."""
    return FASTSCAN if parts == 1 else f"fastscan.{p:05d}.index"


def data_file(header: str) -> str:
    """The .ivfdata a part's header names."""
    return header[:-len(".index")] + ".ivfdata"


# An encoded shard's inverted lists in one file, so that any list range is two ranged reads:
# header (magic, nlist, code_size, ntotal: int64), cum (nlist + 1) int64 running list sizes,
# then per list its codes (n, code_size) uint8 and its ids (n) int64: the entries of lists
# [l0, l1) are the bytes between cum[l0] and cum[l1] entries.
LISTS_LAYOUT = 2  # names the folders of encoded shards: another layout is never reused
_MAGIC = 0x4C49515620 + LISTS_LAYOUT  # "!VQIL" and the layout
_HEAD = 4 * 8


def write_lists(index, f) -> int:
    """Writes the inverted lists of an encoded IVF index to the binary file object f."""
    il = faiss.extract_index_ivf(index).invlists
    nlist, cs = il.nlist, il.code_size
    sizes = np.array([il.list_size(j) for j in range(nlist)], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    f.write(np.array([_MAGIC, nlist, cs, cum[-1]], dtype=np.int64).tobytes())
    f.write(cum.tobytes())
    for j in np.flatnonzero(sizes).tolist():
        f.write(faiss.rev_swig_ptr(il.get_codes(j), int(sizes[j]) * cs).tobytes())
        f.write(faiss.rev_swig_ptr(il.get_ids(j), int(sizes[j])).tobytes())
    return int(cum[-1])


class ShardLists:
    """Lists [l0, l1) of one encoded shard file, in two ranged reads: the running sizes, then
    the entries. `read(start, stop) -> bytes` reads a byte range of the file (one request);
    `rows` is the shard's vector count, which the sizes are checked against."""

    def __init__(self, read, nlist: int, code_size: int, rows: int, l0: int, l1: int):
        self.read, self.cs, self.l0, self.l1 = read, code_size, l0, l1
        # Range 0 starts at the file's head: its one read covers the header too.
        first = 0 if l0 == 0 else _HEAD + 8 * l0
        raw = self._get(first, _HEAD + 8 * (l1 + 1))
        if l0 == 0:
            magic, n_lists, cs, ntotal = np.frombuffer(raw[:_HEAD], np.int64).tolist()
            if (magic, n_lists, cs, ntotal) != (_MAGIC, nlist, code_size, rows):
                raise InputError("not an encoded shard file of this layout, nlist, code size "
                                 "and row count")
            raw = raw[_HEAD:]
        cum = np.frombuffer(raw, np.int64)
        if np.any(np.diff(cum) < 0) or cum[0] < 0 or cum[-1] > rows:
            raise InputError("an encoded shard file's list offsets are damaged")
        self.start, self.sizes = int(cum[0]), np.diff(cum)
        self.data_at = _HEAD + 8 * (nlist + 1)

    def _get(self, start: int, stop: int) -> bytes:
        raw = self.read(start, stop)
        if len(raw) != stop - start:
            raise InputError(f"an encoded shard file is truncated (bytes {start}..{stop})")
        return raw

    def entries(self) -> bytes:
        """The range's entries: per list, its codes then its ids."""
        entry = self.cs + 8
        at = self.data_at + entry * self.start
        return self._get(at, at + entry * int(self.sizes.sum()))


def merge_part(shards: list, out_ivfdata: str) -> np.ndarray:
    """Writes one list range of every encoded shard (ShardLists, in shard order) into the data
    file `out_ivfdata`, in the layout of OnDiskInvertedLists.merge_from_multiple (per list,
    codes then ids, exact capacity; shards in order within a list), starting at the range's
    first list. One shard's range is in memory at a time, and the output is written with
    pwrite, not mapped, so memory stays flat however big the part.

    Returns the range's list sizes (l1 - l0,) int64."""
    if not shards:
        raise InputError("a part needs at least one encoded shard")
    cs = shards[0].cs
    sizes = np.stack([s.sizes for s in shards])  # (shards, lists)
    cap = sizes.sum(0)
    offset = np.concatenate([[0], np.cumsum(cap * (cs + 8))])
    before = np.cumsum(sizes, axis=0) - sizes  # entries of earlier shards in each list
    fd = os.open(out_ivfdata, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.ftruncate(fd, int(offset[-1]))
        for s, shard in enumerate(shards):
            if not sizes[s].any():
                continue
            raw = memoryview(shard.entries())
            pos = 0
            for j in np.flatnonzero(sizes[s]).tolist():
                n, k = int(sizes[s, j]), int(before[s, j])
                os.pwrite(fd, raw[pos:pos + n * cs], int(offset[j]) + k * cs)
                pos += n * cs
                os.pwrite(fd, raw[pos:pos + 8 * n], int(offset[j]) + int(cap[j]) * cs + 8 * k)
                pos += 8 * n
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


def open_parts(paths: list[str]):
    """One faiss index over the on-disk parts whose headers are `paths` (each .ivfdata beside
    its header): part 0's quantizer over every part's lists, stacked with faiss's
    HStackInvertedLists (a list is the concatenation of that list in each part, and each list
    lies in one part). It searches as the single-part index of the same shards does."""
    parts = [read_ondisk(p) for p in paths]
    if len(parts) == 1:
        return parts[0]
    shell = read_ondisk(paths[0])  # part 0 once more: it gives up its lists for the stack
    ivfs = [faiss.extract_index_ivf(p) for p in parts]
    first = ivfs[0]
    for p, ivf in zip(parts, ivfs):
        if (ivf.nlist, ivf.code_size, p.d, p.metric_type) != \
                (first.nlist, first.code_size, parts[0].d, parts[0].metric_type):
            raise InputError("the parts do not come from one trained index")
    lists = faiss.InvertedListsPtrVector()
    for ivf in ivfs:
        lists.push_back(ivf.invlists)
    stacked = faiss.HStackInvertedLists(lists.size(), lists.data())
    target = faiss.extract_index_ivf(shell)
    target.replace_invlists(stacked, True)
    stacked.this.disown()
    target.ntotal = shell.ntotal = sum(ivf.ntotal for ivf in ivfs)
    shell.referenced_objects = parts  # the stack points into them
    return shell


def join_fastscan(parts: list):
    """The fast-scan exports of every part (faiss.read_index each) as one in-memory index:
    part 0 takes the others' lists (faiss's merge_from, which moves them)."""
    out = parts[0]
    ivf = faiss.extract_index_ivf(out)
    for p in parts[1:]:
        ivf.merge_from(faiss.extract_index_ivf(p), 0)
    out.ntotal = ivf.ntotal
    return out


def merge_results(results: list[tuple], k: int, metric: str) -> tuple:
    """The top k per query, (D, I), of several parts' (D, I) results for the same queries
    (faiss's ResultHeap: largest first for "ip", smallest for "l2")."""
    if len(results) == 1:
        return results[0]
    heap = faiss.ResultHeap(len(results[0][0]), k, keep_max=metric == "ip")
    for D, I in results:
        heap.add_result(np.ascontiguousarray(D, np.float32), np.ascontiguousarray(I, np.int64))
    heap.finalize()
    return heap.D, heap.I


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
