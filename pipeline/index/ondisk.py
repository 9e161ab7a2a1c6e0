"""Per-shard encoding and the merge of shard indexes into one OnDiskInvertedLists index."""
from __future__ import annotations

import os

import faiss
import numpy as np


def encode_shard(trained, ids: np.ndarray, x: np.ndarray):
    """A copy of the trained empty index holding x under its global ids."""
    index = faiss.clone_index(trained)
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids.astype(np.int64))
    return index


def merge_ondisk(trained, shard_paths: list[str], out_dir: str,
                 name: str = "index", stored_ivfdata: str | None = None) -> tuple[str, str, int]:
    """Merges shard index files into `out_dir/{name}.index` + `{name}.ivfdata`.

    `stored_ivfdata` is the .ivfdata path recorded inside the .index file (default: its path
    in out_dir). Readers that move the pair elsewhere open it with IO_FLAG_ONDISK_SAME_DIR.
    Returns (index path, ivfdata path, ntotal).
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
    index_path = os.path.join(out_dir, f"{name}.index")
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
    vec = faiss.InvertedListsPtrVector()
    for il in invlists:
        vec.push_back(il)
    ntotal = ondisk.merge_from_multiple(vec.data(), vec.size(), False, False)
    assert ntotal == expected, f"merged {ntotal} vectors, shards hold {expected}"
    ivf.ntotal = index.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    if stored_ivfdata is not None:
        ondisk.filename = stored_ivfdata
    faiss.write_index(index, index_path)
    return index_path, ivfdata, ntotal


def read_ondisk(index_path: str):
    """Opens a published pair wherever it lies (the .ivfdata beside the .index)."""
    # Not IO_FLAG_MMAP: it carries IO_FLAG_SKIP_IVF_DATA, which leaves an OnDisk index unmapped
    # (search then segfaults, faiss 1.15).
    return faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
