"""Probe: does a deeper teacher list keep recall@100? Distilled IVF-OPQ variants side by side,
each from the same faiss-trained index, on the shared data (or any data bench/quality.py
reads).

  python bench/deep_band.py --size 16                      # the variants below, 2 epochs
  python bench/deep_band.py --size 16 --variants '{"k10": {}}' --set train.epochs=1

A variant's teacher list is the exact top `top` (10) plus, with "deep": D and "n": N, N
neighbours drawn per query, uniformly without replacement, from ranks top+1..D (kept in rank
order); the ranking loss orders the top `top` (train.rank_top) and the KL the whole list.
Other keys are train.* fields. The pipeline's teacher keeps the contiguous top teacher.k only:
this probe measures whether the band is worth carrying through the distributed top-k.
Prints recall@10 and recall@100 of faiss and of each variant, with the relative gains.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import quality as Q  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.index import knn  # noqa: E402

VARIANTS = {"k10": {}, "deep300x20": {"deep": 300, "n": 20},
            "deep300x20-kl1": {"deep": 300, "n": 20, "kl_temperature": 1.0}}


def band(S, I, top: int, deep: int, n: int, rng: np.random.Generator):
    """Columns [0, top) of every row plus n of [top, deep), drawn per row, in rank order."""
    cols = np.tile(np.arange(top), (len(I), 1))
    if deep:
        drawn = np.sort(np.stack([rng.choice(np.arange(top, deep), n, replace=False)
                                  for _ in range(len(I))]), 1)
        cols = np.concatenate([cols, drawn], 1)
    return np.take_along_axis(S, cols, 1), np.take_along_axis(I, cols, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="bytes per vector (8-bit PQ)")
    ap.add_argument("--variants", default=json.dumps(VARIANTS))
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "quality.yaml"))
    ap.add_argument("--set", dest="overrides", action="append",
                    default=["data.max_train_queries=20000"])
    ap.add_argument("--nprobe", default="4,32")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(args.config, Q.default_data(os.path.join(ROOT, "runs", "bench", "data"))
                      + args.overrides)
    nprobes = [int(x) for x in args.nprobe.split(",")]
    data, _ = Q.load(cfg)
    icfg = dataclasses.replace(cfg.index, M=args.size, nbits=8, opq=True)
    trained, _ = Q.train_faiss(data.xb, icfg, cfg, {})
    variants = json.loads(args.variants)
    deepest = max([v.get("deep", 0) for v in variants.values()] + [10])
    S, I, _ = knn.block_topk(data.xt, data.xb, data.ids, deepest, cfg.index.metric)
    row_of = np.empty(int(data.ids.max()) + 1, np.int64)
    row_of[data.ids] = np.arange(len(data.ids))
    base = {"bytes_per_vector": args.size, "nlist": icfg.nlist}
    rows = Q.evaluate(trained, data, nprobes, {"method": "faiss", **base})
    rng = np.random.default_rng(cfg.init.seed)  # one stream, drawn from in variant order
    for name, v in variants.items():
        v = dict(v)
        top, deep, n = v.pop("top", 10), v.pop("deep", 0), v.pop("n", 0)
        Sv, Iv = band(S, I, top, deep, n, rng)
        teacher = (Sv, Iv, data.xb[row_of[Iv]])
        pcfg = dataclasses.replace(
            cfg, index=icfg, teacher=dataclasses.replace(cfg.teacher, k=Iv.shape[1]),
            train=dataclasses.replace(cfg.train, rank_top=top, **v))
        t0 = time.time()
        index, _, _ = Q.distill(trained, data, teacher, pcfg)
        rows += Q.evaluate(index, data, nprobes, {"method": name, **base})
        print(f"{name}: distilled in {time.time() - t0:.0f}s", flush=True)
    ref = {r["nprobe"]: r for r in rows if r["method"] == "faiss"}
    for r in rows:
        b = ref[r["nprobe"]]
        gain = [f"{r[m]:.4f} ({(r[m] / b[m] - 1) * 100:+.1f}%)"
                for m in ("recall_at_10", "recall_at_100")]
        print(f"{r['method']:<20} {args.size}B nprobe {r['nprobe']:>3}: R@10 {gain[0]}  "
              f"R@100 {gain[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
