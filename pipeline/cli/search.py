"""Queries a published index: ivf-distill search --index URI --queries FILE -k 10 --nprobe 32

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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import reader, storage
from pipeline.data import readers
from pipeline.errors import InputError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ivf-distill search", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--out", help="write Parquet (query_id, rank, id, score) here instead")
    ap.add_argument("--id-column", default="id",
                    help="the queries' id column (Parquet; absent: row numbers)")
    ap.add_argument("--embedding-column", default="embedding",
                    help="the queries' vector column (Parquet)")
    ap.add_argument("--cache", metavar="FOLDER",
                    help="where copies of S3 files are kept between calls (default "
                         f"${reader.CACHE_ENV} or ~/.cache/ivf-distill)")
    ap.add_argument("--fastscan", action="store_true",
                    help="search the version's fast-scan export (build.fastscan)")
    args = ap.parse_args(argv)
    try:
        if args.nprobe < 1 or args.k < 1:  # before any I/O
            raise InputError(f"--nprobe and -k must be >= 1, got {args.nprobe} and {args.k}")
        qids, xq = readers.read_all(args.queries, "--queries", 0,
                                    (args.id_column, args.embedding_column))
        index = reader.open_index(args.index, args.cache, args.fastscan)
        if xq.shape[1] != index.d:
            raise InputError(f"--queries have d={xq.shape[1]}, the index has d={index.d}")
        if args.nprobe > index.nlist:
            print(f"note: --nprobe {args.nprobe} is more than the index's {index.nlist} lists; "
                  f"using {index.nlist}", file=sys.stderr)
        D, I = index.search(xq, args.k, args.nprobe)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        n, k = I.shape
        table = pa.table({"query_id": np.repeat(qids, k), "rank": np.tile(np.arange(k), n),
                          "id": pa.array(I.ravel()), "score": D.ravel()})
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
