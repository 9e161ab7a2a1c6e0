"""Queries a published index: python jobs/search.py --index URI --queries FILE -k 10 --nprobe 32

--index is a run folder (the version its manifest.json names is used), an index folder
(index.index + index.ivfdata), or an .index file, on a local path or s3://. --queries is any
file in the input contract (Parquet id + embedding, .npy, .fvecs). Prints the top-k ids and
scores per query (stdout holds nothing else), or writes them as Parquet with --out.
--fastscan searches the version's fast-scan export (fastscan.index, published by runs with
build.fastscan) instead of the on-disk pair: the same codes, faster, held in memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import publish, storage  # noqa: E402
from pipeline.data import readers  # noqa: E402
from pipeline.index import build, ondisk  # noqa: E402


def index_folder(uri: str) -> str:
    """The folder of the index pair to open. A run folder is resolved through its manifest
    once, so every file read belongs to the version it named at that moment."""
    uri = uri.rstrip("/")
    if uri.endswith(".index"):
        return uri.rsplit("/", 1)[0]
    if storage.exists(storage.join(uri, publish.POINTER)):
        manifest = publish.resolve(uri)
        return storage.join(uri, manifest["index"].rsplit("/", 1)[0])
    if storage.exists(storage.join(uri, "index.index")):
        return uri
    raise ValueError(f"--index: {uri} holds neither a published run ({publish.POINTER}) nor "
                     "an index.index")


def open_index(uri: str, cache: str, fastscan: bool = False):
    """Opens the published pair, or its fast-scan export; S3 files are copied to `cache`
    first."""
    folder = index_folder(uri)
    if fastscan:
        if not storage.exists(storage.join(folder, publish.FASTSCAN)):
            raise ValueError(f"--fastscan: {folder} has no {publish.FASTSCAN}; publish with "
                             "--set build.fastscan=true (index.nbits=4)")
        local = storage.local_folder(folder, (publish.FASTSCAN,), cache)
        return faiss.read_index(os.path.join(local, publish.FASTSCAN))
    local = storage.local_folder(folder, publish.INDEX_FILES, cache)
    return ondisk.read_ondisk(os.path.join(local, "index.index"))


def check_search_args(index, k: int, nprobe: int) -> int:
    """Validates k and nprobe against the index; returns the nprobe to use (clamped to
    nlist, with a note on stderr)."""
    if nprobe < 1:
        raise ValueError(f"--nprobe must be >= 1, got {nprobe}")
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"-k must be between 1 and the index's {index.ntotal} vectors, got {k}")
    nlist = build.ivfpq_of(index).nlist
    if nprobe > nlist:
        print(f"note: --nprobe {nprobe} is more than the index's {nlist} lists; using {nlist}",
              file=sys.stderr)
        return nlist
    return nprobe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--out", help="write Parquet (query_id, rank, id, score) here instead")
    ap.add_argument("--fastscan", action="store_true",
                    help="search the version's fast-scan export (build.fastscan)")
    args = ap.parse_args(argv)
    try:
        if args.nprobe < 1 or args.k < 1:  # before any I/O
            raise ValueError(f"--nprobe and -k must be >= 1, got {args.nprobe} and {args.k}")
        qids, xq = readers.read_all(args.queries, "--queries")
        with tempfile.TemporaryDirectory() as cache:
            index = open_index(args.index, cache, args.fastscan)
            if xq.shape[1] != index.d:
                raise ValueError(f"--queries have d={xq.shape[1]}, the index has d={index.d}")
            build.set_nprobe(index, check_search_args(index, args.k, args.nprobe))
            D, I = index.search(xq, args.k)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        n, k = I.shape
        table = pa.table({"query_id": np.repeat(qids, k), "rank": np.tile(np.arange(k), n),
                          "id": I.ravel(), "score": D.ravel()})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        storage.write_bytes(args.out, buf.getvalue().to_pybytes())
        print(f"wrote {n} x {k} results to {args.out}", file=sys.stderr)
        return 0
    try:
        for q, ids, scores in zip(qids, I, D):
            hits = " ".join(f"{i}:{s:.4f}" for i, s in zip(ids, scores))
            print(f"{q}\t{hits}")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
