"""Queries a published index: python jobs/search.py --index URI --queries FILE -k 10 --nprobe 32

--index is a run folder (its index/ is used), an index/ folder, or an .index file, on a local
path or s3://. --queries is any file in the input contract (Parquet id + embedding, .npy,
.fvecs). Prints the top-k ids and scores per query, or writes them as Parquet with --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import storage  # noqa: E402
from pipeline.data import readers  # noqa: E402
from pipeline.index import build, ondisk  # noqa: E402


def index_folder(uri: str) -> str:
    uri = uri.rstrip("/")
    if uri.endswith(".index"):
        return uri.rsplit("/", 1)[0]
    if storage.exists(storage.join(uri, "index", "index.index")):
        return storage.join(uri, "index")
    if storage.exists(storage.join(uri, "index.index")):
        return uri
    raise ValueError(f"--index: no index.index under {uri} (give a run folder or its index/)")


def open_index(uri: str, cache: str):
    """Opens the published pair; S3 files are copied to `cache` first."""
    folder = index_folder(uri)
    if not storage.is_s3(folder):
        return ondisk.read_ondisk(os.path.join(folder, "index.index"))
    for name in ("index.ivfdata", "index.index"):
        storage.download_file(storage.join(folder, name), os.path.join(cache, name))
    return ondisk.read_ondisk(os.path.join(cache, "index.index"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--out", help="write Parquet (query_id, rank, id, score) here instead")
    args = ap.parse_args(argv)
    try:
        qids, xq = readers.read_all(args.queries, "--queries")
        with tempfile.TemporaryDirectory() as cache:
            index = open_index(args.index, cache)
            if xq.shape[1] != index.d:
                raise ValueError(f"--queries have d={xq.shape[1]}, the index has d={index.d}")
            build.set_nprobe(index, args.nprobe)
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
        print(f"wrote {n} x {k} results to {args.out}")
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
