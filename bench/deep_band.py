"""Probe: what a band of deeper teacher neighbours (teacher.band_*) does to recall@10 and
recall@100. Distilled IVF-OPQ variants side by side, each from the same faiss-trained index,
on the shared data (or any data bench/quality.py reads).

  python bench/deep_band.py --size 16                      # the variants below, 2 epochs
  python bench/deep_band.py --size 8 --variants \
      '{"top10": {}, "band": {"teacher.band_depth": 300, "teacher.band_size": 20}}'

A variant is a set of config overrides (teacher.* and train.* fields) on bench/quality.yaml;
its teacher lists are drawn exactly as the pipeline's teacher draws them
(pipeline.index.knn.Band). Prints recall@10 and recall@100 of faiss and of each variant, with
the relative gains, and each variant's distillation time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import quality as Q  # noqa: E402
from pipeline.config import load_config  # noqa: E402

NO_BAND = {"teacher.band_depth": 0, "teacher.band_size": 0}
VARIANTS = {"top10": {**NO_BAND, "loss.kl_temperature": 2.0},
            "band300x20": {"teacher.band_depth": 300, "teacher.band_size": 20},
            "band300x40": {"teacher.band_depth": 300, "teacher.band_size": 40}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=16, help="bytes per vector (8-bit PQ)")
    ap.add_argument("--variants", default=json.dumps(VARIANTS))
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "quality.yaml"))
    ap.add_argument("--set", dest="overrides", action="append",
                    default=["data.max_train_queries=20000"])
    ap.add_argument("--nprobe", default="1,4,32")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    base_args = Q.default_data(os.path.join(ROOT, "runs", "bench", "data")) + args.overrides
    cfg = load_config(args.config, base_args)
    nprobes = [int(x) for x in args.nprobe.split(",")]
    data, _ = Q.load(cfg)
    icfg = dataclasses.replace(cfg.index, M=args.size, nbits=8, opq=True)
    trained, _ = Q.train_faiss(data.xb, icfg, cfg, {})
    base = {"bytes_per_vector": args.size, "nlist": icfg.nlist}
    rows = Q.evaluate(trained, data, nprobes, {"method": "faiss", **base})
    for name, v in json.loads(args.variants).items():
        vcfg = load_config(args.config, base_args + [f"{k}={x}" for k, x in v.items()])
        vcfg = dataclasses.replace(vcfg, index=icfg)
        t0 = time.time()
        index, _, _ = Q.distill(trained, data, Q.teacher_lists(data, vcfg), vcfg)
        rows += Q.evaluate(index, data, nprobes, {"method": name, **base})
        print(f"{name}: teacher and distillation in {time.time() - t0:.0f}s", flush=True)
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
