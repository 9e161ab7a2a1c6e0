"""Writes a dataset in the pipeline's input contract (Parquet id + embedding) to a local path
or s3:// prefix:  <out>/corpus/part-*.parquet, train_queries/, eval_queries/, labels/.

  ivf-distill prepare --source ../shared/data/debian-minilm --out s3://demo/debian-minilm
  ivf-distill prepare --synthetic 4000 --dim 32 --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

log = logging.getLogger("ivf_distill.prepare")


def embedding_table(ids: np.ndarray, x: np.ndarray) -> pa.Table:
    x = np.ascontiguousarray(x, dtype=np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table({"id": pa.array(ids, pa.int64()), "embedding": emb})


def write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    # Page checksums let readers tell a corrupted file from a good one.
    pq.write_table(table, buf, row_group_size=8192, write_page_checksum=True)
    storage.write_bytes(uri, buf.getvalue())


def write_dataset(out: str, xb, xq_train, train_ids, xq_eval, eval_ids, labels, files: int):
    n = len(xb)
    for i in range(files):
        a, b = n * i // files, n * (i + 1) // files
        write_table(embedding_table(np.arange(a, b), xb[a:b]),
                    storage.join(out, "corpus", f"part-{i:04d}.parquet"))
    write_table(embedding_table(train_ids, xq_train),
                storage.join(out, "train_queries", "q.parquet"))
    write_table(embedding_table(eval_ids, xq_eval), storage.join(out, "eval_queries", "q.parquet"))
    if labels is not None:
        write_table(pa.table({"query_id": pa.array(labels[0], pa.int64()),
                              "doc_id": pa.array(labels[1], pa.int64())}),
                    storage.join(out, "labels", "qrels.parquet"))
    log.info("wrote %d corpus vectors in %d files, %d train and %d eval queries to %s",
             n, files, len(train_ids), len(eval_ids), out)


def from_shared(src: str):
    xb = np.load(os.path.join(src, "corpus.npy")).astype(np.float32)
    xq = np.load(os.path.join(src, "queries.npy")).astype(np.float32)
    tr = np.load(os.path.join(src, "train_query_ids.npy"))
    ev = np.load(os.path.join(src, "eval_query_ids.npy"))
    # Query i is relevant to document i; only the eval labels are written.
    return xb, xq[tr], tr, xq[ev], ev, (ev, ev)


def synthetic(n: int, d: int, seed: int = 0):
    """Tiny seeded clustered data for tests: queries are noisy copies of corpus points."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(8, n // 100), d)).astype(np.float32)
    xb = centers[rng.integers(len(centers), size=n)] + 0.5 * rng.standard_normal((n, d))
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    nq = max(200, n // 4)
    src = rng.integers(n, size=nq)
    xq = xb[src] + 0.3 * rng.standard_normal((nq, d)) / np.sqrt(d)
    xq = (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)
    n_eval = nq // 4
    ev, tr = np.arange(n_eval), np.arange(n_eval, nq)
    return xb.astype(np.float32), xq[tr], tr, xq[ev], ev, (ev, src[:n_eval])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ivf-distill prepare", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--source", help="folder with corpus.npy, queries.npy, *_query_ids.npy")
    g.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic vectors")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--files", type=int, default=4, help="corpus Parquet files to write")
    ap.add_argument("--out", required=True, help="local path or s3:// prefix")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aiobotocore", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data = from_shared(args.source) if args.source else synthetic(args.synthetic, args.dim)
    write_dataset(args.out, *data, files=args.files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
