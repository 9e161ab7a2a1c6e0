"""The GPU paths one machine can run, on `cuda` beside the CPU, compared; no Ray.

  python bench/gpu_check.py                # about 2-4 minutes; CPU only where torch has no CUDA
  python bench/gpu_check.py --quick        # tiny shapes (the test suite runs this, CPU only)
  python bench/gpu_check.py --json runs/gpu_check.json

1. The teacher's kernel (pipeline.index.knn.block_topk): the same lists on the device as on
   the CPU (faiss), and its pairs/s against a bare fp16 GEMM + top-k of the same shapes.
2. The training kernel (pipeline.quant.loop.train_epoch) for a few steps at M = 64,
   nlist 1,024, for the PQ and RQ students: the same step losses on both (within a
   tolerance: GPU sums run in another order), and the step rate.
3. faiss-gpu's clone options and fallbacks (pipeline.index.gpu) where this faiss has GPUs:
   IVF-PQ at M = 64 (float16 look-up tables), 4-bit codes (interleaved), an HNSW coarse
   quantizer (flat centroids), IVF-RQ (the CPU, with a warning); each answers as the CPU's.
Prints a table (check, CPU, device, agreement) and exits 1 if any comparison fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faiss  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Coarse, IndexConfig, Quantizer, load_config  # noqa: E402
from pipeline.index import build, gpu, knn  # noqa: E402
from pipeline.quant import fit, loop  # noqa: E402

SHAPES = {  # corpus, queries, d, nlist, M, train steps, batch
    "full": dict(n=200_000, nq=8192, d=128, nlist=1024, M=64, steps=5, batch=256),
    "quick": dict(n=6000, nq=256, d=64, nlist=32, M=16, steps=2, batch=32),
}


def _data(n: int, nq: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, d)).astype(np.float32)
    x = centers[rng.integers(256, size=n + nq)] + rng.standard_normal((n + nq, d)) * 0.6
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x[:n], x[n:]


def _time(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _lists_agree(a, b, tol: float = 1e-3) -> float:
    """The share of (query, rank) cells whose ids agree or whose scores tie within tol."""
    (Sa, Ia), (Sb, Ib) = a, b
    return float(((Ia == Ib) | (np.abs(Sa - Sb) <= tol)).mean())


def check_teacher(xb, xq, device: str | None, k: int = 100) -> list[dict]:
    ids = np.arange(len(xb))
    (S, I, _), cpu_s = _time(lambda: knn.block_topk(xq, xb, ids, k, "ip"))
    row = {"check": f"teacher top-{k} ({len(xq)} x {len(xb)} x {xb.shape[1]})",
           "cpu": f"{len(xq) * len(xb) / cpu_s:.3g} pairs/s"}
    if device:
        knn.block_topk(xq[:64], xb, ids, k, "ip", device=device)  # warm-up
        (Sd, Id, _), dev_s = _time(lambda: knn.block_topk(xq, xb, ids, k, "ip",
                                                          device=device))
        xb_t = torch.as_tensor(xb, device=device, dtype=torch.float16)
        xq_t = torch.as_tensor(xq, device=device, dtype=torch.float16)
        _, bare_s = _time(lambda: (xq_t @ xb_t.T).float().topk(k, dim=1))
        row.update(device=f"{len(xq) * len(xb) / dev_s:.3g} pairs/s "
                          f"({bare_s / dev_s:.0%} of a bare fp16 GEMM + top-k)",
                   agree=_lists_agree((S, I), (Sd, Id)))
        row["ok"] = row["agree"] >= 0.999
    return [row]


def _student_run(params, data, cfg, device: str, steps: int) -> tuple[list, float]:
    recipe = loop.Recipe(cfg.train, dataclasses.replace(cfg.loss, rank_top=cfg.teacher.k),
                         cfg.negatives)
    model = fit.build_student(params, cfg).to(device)
    loop.calibrate(model, data.pool[:4096])
    opt = loop.make_optimizer(model, cfg.train)
    m, secs = _time(lambda: loop.train_epoch(model, opt, data, recipe, 0, device=device))
    return m["step_losses"][:steps], steps / secs


def check_training(xb, xq, shape: dict, device: str | None) -> list[dict]:
    rows = []
    K = 10
    V = knn.block_topk(xq, xb, np.arange(len(xb)), K, "ip", with_vectors=True)[2]
    nq = shape["steps"] * shape["batch"]
    data = loop.TrainData(xq[:nq], V[:nq], xb[:20_000])
    for quantizer in (Quantizer.PQ, Quantizer.RQ):
        opq = quantizer == Quantizer.PQ
        icfg = IndexConfig(nlist=shape["nlist"], M=shape["M"], nbits=8 if opq else 4, opq=opq,
                           quantizer=quantizer)
        trained = build.train_baseline(xb[:max(40 * shape["nlist"], 20_000)], icfg, niter=4,
                                       opq_niter=2)
        cfg = load_config(None, [
            "data.corpus=/x", "train.epochs=1", f"train.batch_size={shape['batch']}",
            f"teacher.k={K}", "teacher.band_depth=0", "teacher.band_size=0",
            f"index.quantizer={quantizer.value}", f"index.M={icfg.M}",
            f"index.nbits={icfg.nbits}", f"index.opq={str(opq).lower()}",
            f"index.nlist={icfg.nlist}"])
        params = build.extract_params(trained)
        cpu_losses, cpu_rate = _student_run(params, data, cfg, "cpu", shape["steps"])
        row = {"check": f"train {quantizer.value} M={icfg.M} nbits={icfg.nbits} "
                        f"nlist={icfg.nlist}", "cpu": f"{cpu_rate:.2f} steps/s"}
        if device:
            dev_losses, dev_rate = _student_run(params, data, cfg, device, shape["steps"])
            diff = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cpu_losses, dev_losses))
            row.update(device=f"{dev_rate:.2f} steps/s", agree=1 - diff, ok=diff < 1e-2)
        rows.append(row)
    return rows


def check_clones(xb, xq) -> list[dict]:
    if not gpu.gpu_count():
        return [{"check": "faiss-gpu clones", "cpu": gpu.library(),
                 "device": "no GPU in this faiss: skipped"}]
    rows = []
    d = xb.shape[1]
    cases = {"IVF-PQ M=64, 8-bit (float16 tables)": IndexConfig(nlist=256, M=64, nbits=8,
                                                                opq=False),
             "IVF-PQ 4-bit (interleaved)": IndexConfig(nlist=256, M=d // 4, nbits=4, opq=False),
             "IVF-PQ, HNSW coarse (flat copy)": IndexConfig(nlist=256, M=16, nbits=8, opq=False,
                                                            coarse=Coarse.HNSW),
             "IVF-RQ (CPU fallback)": IndexConfig(nlist=256, M=8, nbits=4, opq=False,
                                                  quantizer=Quantizer.RQ)}
    ids = np.arange(len(xb))
    for name, icfg in cases.items():
        trained = build.train_baseline(xb[:20_000], icfg, niter=4)
        ref = faiss.clone_index(gpu.flat_coarse(trained))
        ref.add_with_ids(xb, ids)
        got, where = gpu.encode(trained, ids, xb, use_gpu=True)
        for index in (ref, got):
            build.set_nprobe(index, 16)
        agree = _lists_agree(ref.search(xq, 10), got.search(xq, 10))
        rows.append({"check": name, "cpu": "reference", "device": where, "agree": agree,
                     "ok": agree >= 0.99})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds, for tests)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    shape = SHAPES["quick" if args.quick else "full"]
    device = "cuda" if torch.cuda.is_available() else None
    torch.manual_seed(0)
    xb, xq = _data(shape["n"], shape["nq"], shape["d"])
    rows = check_teacher(xb, xq, device) + check_training(xb, xq, shape, device) + \
        check_clones(xb, xq)
    head = {"check": "check", "cpu": "cpu", "device": device or "cuda: not available",
            "agree": "agreement"}
    table = [head] + [{**r, "agree": "" if "agree" not in r else f"{r['agree']:.4f}"}
                      for r in rows]
    widths = {c: max(len(str(r.get(c, ""))) for r in table) for c in head}
    for r in table:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in head))
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu.library()}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "faiss": gpu.library(),
                       "rows": rows}, f, indent=2)
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
