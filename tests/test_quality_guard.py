"""The quality guard: on a small real slice of the shared data (../shared/data), distillation
must beat faiss's k-means-trained IVF-PQ, and faiss's residual-quantized IVF-RQ (greedy
encoding, as both are built by default), at 8 bytes per vector, through the benchmark's own
code path (bench/quality.py). A regression in the method then cannot land green.

Synthetic data is no evidence of quality, so this test reads the real embeddings; it is
skipped, saying so, only where the shared data is absent (CI has it). IVF-PQ rather than the
default IVF-OPQ: faiss's OPQ training alone takes ~15 s here, and the rotation is checked by
tests/test_quant.py and tests/test_e2e.py; the codebooks, the centroids and the loss, which
this guards, are the same.

Measured when it was written (slice seeds 0 and 1, 8,000 documents, 8,000 training queries,
1,000 evaluation queries): IVF-PQ R@10 +20.5% to +26.8% over faiss, R@100 +3.4% to +9.3%;
IVF-RQ (2026-12-05) R@10 +6.5% to +8.1%, R@100 +1.0% to +1.8%."""
import os

import numpy as np
import pytest

from bench import quality
from pipeline.config import load_config
from pipeline.index import knn

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "debian-minilm")
N_DOCS, N_TRAIN, N_EVAL = 8000, 8000, 1000
# Per student: its settings, and half the smallest R@10 gain measured above (a method that
# loses half its edge fails).
CASES = {"ivf-pq": (["index.opq=false"], 0.10),
         "ivf-rq": (["index.opq=false", "index.quantizer=rq"], 0.03)}


@pytest.fixture(scope="module")
def data():
    if not os.path.exists(os.path.join(SHARED, "corpus.npy")):
        pytest.skip(f"the shared data is not at {SHARED}")
    xb = np.load(os.path.join(SHARED, "corpus.npy"), mmap_mode="r")
    xq = np.load(os.path.join(SHARED, "queries.npy"), mmap_mode="r")
    train = np.load(os.path.join(SHARED, "train_query_ids.npy"))
    evals = np.load(os.path.join(SHARED, "eval_query_ids.npy"))
    rng = np.random.default_rng(0)
    docs = np.sort(rng.choice(len(xb), N_DOCS, replace=False))
    xb = np.ascontiguousarray(xb[docs], dtype=np.float32)
    xt = np.ascontiguousarray(xq[np.sort(rng.choice(train, N_TRAIN, replace=False))],
                              dtype=np.float32)
    xe = np.ascontiguousarray(xq[np.sort(rng.choice(evals, N_EVAL, replace=False))],
                              dtype=np.float32)
    ids = np.arange(N_DOCS, dtype=np.int64)
    gt = knn.block_topk(xe, xb, ids, 100, "ip")[1]
    return quality.Data(ids, xb, xt, np.arange(N_EVAL), xe, None, gt)


@pytest.mark.parametrize("student", sorted(CASES))
def test_distillation_beats_faiss_at_8_bytes(data, student):
    """One epoch on the real training queries; judged on evaluation queries (labels unused)
    against the exact top-100 of the slice, at two nprobes."""
    overrides, min_gain = CASES[student]
    cfg = load_config(os.path.join(quality.ROOT, "bench", "quality.yaml"),
                      ["data.corpus=unused", "index.nlist=32", "index.M=8", *overrides,
                       f"data.train_sample={N_DOCS}", "train.epochs=1", "eval.nprobe=[2, 8]"])
    assert cfg.index.nbits == 8  # 8 sub-quantizers of 8 bits: 8 bytes per vector
    trained, _ = quality.train_faiss(data.xb, cfg.index, cfg, {})
    base = {"bytes_per_vector": 8, "nlist": 32}
    faiss_rows = quality.evaluate(trained, data, cfg.eval.nprobe, {"method": "faiss", **base})
    teacher = quality.teacher_lists(data, cfg)  # the default band included
    index, _, state = quality.distill(trained, data, teacher, cfg)
    ours = quality.evaluate(index, data, cfg.eval.nprobe, {"method": "distilled", **base})
    assert state["best_val"] > state["warm_val"], "training must improve on the warm start"
    for f, d in zip(faiss_rows, ours):
        gain = d["recall_at_10"] / f["recall_at_10"] - 1
        print(f"nprobe {f['nprobe']}: R@10 faiss {f['recall_at_10']:.4f}, distilled "
              f"{d['recall_at_10']:.4f} ({gain:+.1%}); R@100 {f['recall_at_100']:.4f} -> "
              f"{d['recall_at_100']:.4f}")
        assert gain >= min_gain, f"nprobe {f['nprobe']}: distillation gains only {gain:+.1%}"
        assert d["recall_at_100"] >= f["recall_at_100"], f"nprobe {f['nprobe']}: R@100 fell"
