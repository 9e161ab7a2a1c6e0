"""The teacher's exact top-k kernel against bare faiss, side by side in one process.

  .venv/bin/python bench/teacher_kernel.py [--n 60000] [--nq 4096] [--d 384] [--k 300]
      [--data ../shared/data/debian-minilm] [--json runs/bench/teacher_kernel.json]

Each row searches the same queries over the same corpus on the same threads: faiss's
IndexFlatIP (what the teacher ran before, and what a user would write) and the pipeline's
kernel (pipeline.index.knn.block_topk, its tiled GEMM + top-k), at the band's depth (k = 300,
the default teacher.band_depth) and at k = 10. Pairs/s = queries x corpus rows / seconds,
the best of --repeats runs. The answers agree up to float rounding of the scores; the table
shows how many ids differ and the largest score difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data(args) -> tuple[np.ndarray, np.ndarray]:
    if args.data and os.path.exists(os.path.join(args.data, "corpus.npy")):
        xb = np.load(os.path.join(args.data, "corpus.npy"), mmap_mode="r")[:args.n]
        xq = np.load(os.path.join(args.data, "queries.npy"), mmap_mode="r")[:args.nq]
        return np.ascontiguousarray(xb, np.float32), np.ascontiguousarray(xq, np.float32)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, args.d)).astype(np.float32)
    xq = rng.standard_normal((args.nq, args.d)).astype(np.float32)
    return xb / np.linalg.norm(xb, axis=1, keepdims=True), \
        xq / np.linalg.norm(xq, axis=1, keepdims=True)


def best_of(fn, repeats: int) -> tuple[float, tuple]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--nq", type=int, default=4096)
    ap.add_argument("--d", type=int, default=384, help="for synthetic data")
    ap.add_argument("--k", type=int, nargs="+", default=[300, 10])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/debian-minilm",
                    help="a folder with corpus.npy and queries.npy; synthetic without it")
    ap.add_argument("--json", default="runs/bench/teacher_kernel.json")
    args = ap.parse_args(argv)

    import faiss
    import torch

    from pipeline.index.knn import block_topk

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    xb, xq = data(args)
    ids = np.arange(len(xb))
    rows = []
    for k in args.k:
        def bare():
            index = faiss.IndexFlatIP(xb.shape[1])
            index.add(xb)
            return index.search(xq, k)

        t_faiss, (D0, I0) = best_of(bare, args.repeats)
        t_ours, (D1, I1, _) = best_of(lambda: block_topk(xq, xb, ids, k, "ip"), args.repeats)
        pairs = len(xq) * len(xb)
        rows.append({"n": len(xb), "nq": len(xq), "d": xb.shape[1], "k": k,
                     "threads": args.threads, "faiss_pairs_per_s": pairs / t_faiss,
                     "kernel_pairs_per_s": pairs / t_ours, "ratio": t_faiss / t_ours,
                     "ids_differing": float(np.mean(I0 != I1)),
                     "max_score_diff": float(np.abs(D0 - D1).max())})
    head = f"{'n':>8} {'nq':>6} {'d':>4} {'k':>4} {'faiss pairs/s':>14} {'kernel':>10} " \
           f"{'ratio':>6} {'ids differ':>10} {'max dS':>8}"
    print(head)
    for r in rows:
        print(f"{r['n']:>8} {r['nq']:>6} {r['d']:>4} {r['k']:>4} {r['faiss_pairs_per_s']:>14.3g} "
              f"{r['kernel_pairs_per_s']:>10.3g} {r['ratio']:>6.2f} {r['ids_differing']:>10.4f} "
              f"{r['max_score_diff']:>8.1e}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
