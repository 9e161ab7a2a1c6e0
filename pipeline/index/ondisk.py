"""Per-shard encoding and the merge of shard indexes into one OnDiskInvertedLists index."""
from __future__ import annotations

import os
import shutil

import faiss
import numpy as np


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
# is cut into list ranges; one task per range merges that range of every shard into its own
# slice file; a last step concatenates the slices. merge_from_multiple lays the lists out in
# list order with exact capacities, so the slices concatenated are byte for byte the file a
# single merge writes, and the final metadata follows from the list sizes alone.

def list_ranges(nlist: int, n_ranges: int) -> list[tuple[int, int]]:
    """[l0, l1) ranges covering 0..nlist, as even as possible, none empty."""
    n_ranges = max(1, min(n_ranges, nlist))
    cuts = np.linspace(0, nlist, n_ranges + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def split_by_range(index, ranges: list[tuple[int, int]]) -> list[dict]:
    """Cuts an encoded IVF index by list range: per range {"sizes": (l1-l0,) int64,
    "ids": (n,) int64, "codes": (n, code_size) uint8}, lists in order."""
    il = faiss.extract_index_ivf(index).invlists
    cs = il.code_size
    out = []
    for l0, l1 in ranges:
        sizes = np.array([il.list_size(j) for j in range(l0, l1)], dtype=np.int64)
        ids, codes = [], []
        for j, n in zip(range(l0, l1), sizes.tolist()):
            if n:
                ids.append(faiss.rev_swig_ptr(il.get_ids(j), n).copy())
                codes.append(faiss.rev_swig_ptr(il.get_codes(j), n * cs).copy())
        out.append({
            "sizes": sizes,
            "ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "codes": (np.concatenate(codes) if codes else np.zeros(0, np.uint8)).reshape(-1, cs),
        })
    return out


def _as_invlists(part: dict):
    sizes, ids, codes = part["sizes"], part["ids"], np.ascontiguousarray(part["codes"])
    il = faiss.ArrayInvertedLists(len(sizes), codes.shape[1])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for j in np.flatnonzero(sizes):
        a, b = int(starts[j]), int(starts[j + 1])
        il.add_entries(int(j), b - a, faiss.swig_ptr(ids[a:b]), faiss.swig_ptr(codes[a:b]))
    return il


def merge_range(parts: list[dict], out_ivfdata: str) -> np.ndarray:
    """Merges one list range of every shard (split_by_range outputs, in shard order) into the
    slice file `out_ivfdata`. Returns the range's list sizes (l1 - l0,) int64."""
    nl, cs = len(parts[0]["sizes"]), parts[0]["codes"].shape[1]
    assert all(len(p["sizes"]) == nl and p["codes"].shape[1] == cs for p in parts), \
        "range parts disagree on the range or the code size"
    invlists = [_as_invlists(p) for p in parts]
    ondisk = faiss.OnDiskInvertedLists(nl, cs, out_ivfdata)
    _merge_into(ondisk, invlists)
    sizes = np.array([ondisk.list_size(j) for j in range(nl)], dtype=np.int64)
    del ondisk  # unmaps and closes the slice file
    return sizes


def stitch_ranges(trained, slice_paths, sizes: np.ndarray, out_dir: str,
                  name: str = "index", stored_ivfdata: str | None = None,
                  remove_slices: bool = False):
    """Concatenates the slice files (in range order) into `{name}.ivfdata` and writes the
    `{name}.index` that maps it. sizes: (nlist,) list sizes. Same return as merge_ondisk.

    slice_paths may be a generator that fetches each slice when asked; with remove_slices each
    is deleted once copied, so the local disk holds one slice beside the output at a time.
    """
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.ntotal == 0, "the trained index must be empty"
    assert len(sizes) == ivf.nlist, "one size per inverted list"
    ivfdata = os.path.join(out_dir, f"{name}.ivfdata")
    with open(ivfdata, "wb") as out:
        for p in slice_paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
            if remove_slices:
                os.remove(p)
    entry = ivf.code_size + 8  # codes plus one int64 id per vector
    offsets = np.concatenate([[0], np.cumsum(sizes * entry)])
    assert os.path.getsize(ivfdata) == offsets[-1], "slice files do not add up to the lists"
    # update_totsize sets the size and free-slot bookkeeping exactly as a single merge does,
    # but it starts by truncating its file: point it at a sparse placeholder, then at ivfdata.
    placeholder = ivfdata + ".placeholder"
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, placeholder)
    ondisk.update_totsize(int(offsets[-1]))
    ondisk.filename = ivfdata
    lists = faiss.OnDiskOneListVector()
    for j, n in enumerate(sizes.tolist()):
        one = faiss.OnDiskOneList()
        one.size = one.capacity = n
        one.offset = int(offsets[j])
        lists.push_back(one)
    ondisk.lists = lists
    out = _write_ondisk_index(index, ondisk, int(sizes.sum()), out_dir, name, stored_ivfdata)
    del index  # unmaps the placeholder
    os.remove(placeholder)
    return out


def read_ondisk(index_path: str):
    """Opens a published pair wherever it lies (the .ivfdata beside the .index)."""
    # Not IO_FLAG_MMAP: it carries IO_FLAG_SKIP_IVF_DATA, which leaves an OnDisk index unmapped
    # (search then segfaults, faiss 1.15).
    return faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
