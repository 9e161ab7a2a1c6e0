"""Queries a published index: python jobs/search.py --index URI --queries FILE -k 10 --nprobe 32

--index is a run folder (the version its manifest.json names is used), an index folder (its
parts: index.index + index.ivfdata, or index.<p>.index + .ivfdata each), or one part's .index
file, which searches that part alone (one server of an index served part by part), on a local
path or s3://. --queries is any file in the input contract (Parquet id + embedding, .npy,
.fvecs). Prints the top-k ids and scores per query (stdout holds nothing else), or writes them
as Parquet with --out. --fastscan searches the version's fast-scan exports (fastscan.index, or
one per part, published by runs with build.fastscan) instead of the on-disk parts: the same
codes, faster, held in memory.
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
from pipeline.errors import InputError
from pipeline.index import build, ondisk  # noqa: E402


def index_files(uri: str) -> tuple[str, list[str], list[str]]:
    """(folder, part headers, fast-scan exports) to open. A run folder is resolved through
    its manifest once, so every file read belongs to the version it named at that moment; an
    index folder gives all its parts; one part's .index file gives that part alone (one
    server of a sharded index)."""
    uri = uri.rstrip("/")
    if uri.endswith(".index"):
        folder, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
        part = bool(ondisk.HEADER_RE.match(name))
        return folder, [name] if part else [], [] if part else [name]
    if storage.exists(storage.join(uri, publish.POINTER)):
        manifest = publish.resolve(uri)
        parts = manifest["index_parts"]
        folder = parts[0].rsplit("/", 1)[0]
        return (storage.join(uri, folder), [p.rsplit("/", 1)[1] for p in parts],
                [p.rsplit("/", 1)[1] for p in manifest.get("fastscan_parts", [])])
    names = storage.listdir(uri)
    headers = [n for n in names if ondisk.HEADER_RE.match(n)]
    if headers:
        return uri, headers, [n for n in names if ondisk.FASTSCAN_RE.match(n)]
    raise InputError(f"--index: {uri} holds neither a published run ({publish.POINTER}) nor "
                     "an index's parts (index.index, or index.<p>.index)")


def open_index(uri: str, cache: str, fastscan: bool = False):
    """Opens the published parts as one index (ondisk.open_parts), or their fast-scan exports
    (joined in memory); S3 files are copied to `cache` first."""
    folder, headers, fastscans = index_files(uri)
    if fastscan:
        if not fastscans:
            raise InputError(f"--fastscan: {folder} has no {ondisk.FASTSCAN}; publish with "
                             "--set build.fastscan=true (index.nbits=4)")
        local = storage.local_folder(folder, tuple(fastscans), cache)
        return ondisk.join_fastscan([faiss.read_index(os.path.join(local, f))
                                     for f in fastscans])
    if not headers:
        raise InputError(f"--index: {uri} is not an on-disk index part (index[.<p>].index)")
    names = tuple(n for h in headers for n in (ondisk.data_file(h), h))
    local = storage.local_folder(folder, names, cache)
    return ondisk.open_parts([os.path.join(local, h) for h in headers])


def check_search_args(index, k: int, nprobe: int) -> int:
    """Validates k and nprobe against the index; returns the nprobe to use (clamped to
    nlist, with a note on stderr)."""
    if nprobe < 1:
        raise InputError(f"--nprobe must be >= 1, got {nprobe}")
    if not 1 <= k <= index.ntotal:
        raise InputError(f"-k must be between 1 and the index's {index.ntotal} vectors, got {k}")
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
            raise InputError(f"--nprobe and -k must be >= 1, got {args.nprobe} and {args.k}")
        qids, xq = readers.read_all(args.queries, "--queries")
        with tempfile.TemporaryDirectory() as cache:
            index = open_index(args.index, cache, args.fastscan)
            if xq.shape[1] != index.d:
                raise InputError(f"--queries have d={xq.shape[1]}, the index has d={index.d}")
            build.set_nprobe(index, check_search_args(index, args.k, args.nprobe))
            D, I = index.search(xq, args.k)
    except InputError as e:
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
