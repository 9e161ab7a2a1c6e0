"""faiss index construction: the k-means-trained baseline, and export of learned parameters.

Parameters are a dict of numpy arrays:
  rotation  (d, d) float32 or absent: x_rot = x @ rotation.T (faiss OPQMatrix.A)
  centroids (nlist, d) float32, in the rotated space
  codebooks (M, ksub, dsub) float32: PQ of the residual x_rot - centroid
  flat      present for a plain PQ/OPQ index (no IVF): one zero centroid stands in for it

IndexConfig.nlist == 0 asks for that flat PQ/OPQ structure (benchmarks; the pipeline's on-disk
index always has IVF).
"""
from __future__ import annotations

import faiss
import numpy as np

from pipeline.config import IndexConfig


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def check_shape(cfg: IndexConfig, d: int, n_train: int) -> None:
    """User-facing checks that need the data's dimension and the training sample size."""
    if d % cfg.M:
        divisors = [m for m in range(1, d + 1) if d % m == 0 and m <= 64]
        raise ValueError(
            f"index.M={cfg.M} does not divide the dimension d={d}; choose one of {divisors}"
        )
    need = max(cfg.nlist, 1 << cfg.nbits)
    if n_train < need:
        raise ValueError(
            f"{n_train} training vectors are fewer than the {need} centroids to learn "
            f"(index.nlist={cfg.nlist}, 2**index.nbits={1 << cfg.nbits}); lower them"
        )


def ivfpq_of(index) -> faiss.IndexIVFPQ:
    """The IndexIVFPQ inside `index` (which may sit behind a pre-transform)."""
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def train_baseline(xt: np.ndarray, cfg: IndexConfig, niter: int = 20, seed: int = 0):
    """faiss's own k-means IVF + PQ (+ OPQ) trained on xt: the baseline and the warm start."""
    d = xt.shape[1]
    key = f"PQ{cfg.M}x{cfg.nbits}"
    if cfg.nlist:
        key = f"IVF{cfg.nlist},{key}"
    if cfg.opq:
        key = f"OPQ{cfg.M},{key}"
    index = faiss.index_factory(d, key, faiss_metric(cfg.metric))
    if cfg.nlist:
        ivf = ivfpq_of(index)
        ivf.cp.niter = niter
        ivf.cp.seed = seed
        ivf.pq.cp.seed = seed
    else:
        faiss.downcast_index(_inner(index)).pq.cp.seed = seed
    index.train(np.ascontiguousarray(xt, dtype=np.float32))
    return index


def _inner(index):
    return index.index if isinstance(index, faiss.IndexPreTransform) else index


def extract_params(index) -> dict:
    inner = faiss.downcast_index(_inner(index))
    if isinstance(inner, faiss.IndexPQ):
        pq = inner.pq
        params = {"centroids": np.zeros((1, inner.d), np.float32), "flat": np.array(1)}
    else:
        ivf = ivfpq_of(index)
        pq = ivf.pq
        quantizer = faiss.downcast_index(ivf.quantizer)
        params = {"centroids": quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)}
    params["codebooks"] = faiss.vector_to_array(pq.centroids) \
        .reshape(pq.M, pq.ksub, pq.dsub).astype(np.float32)
    if isinstance(index, faiss.IndexPreTransform):
        lt = faiss.downcast_VectorTransform(index.chain.at(0))
        params["rotation"] = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in)
    return params


def index_from_params(params: dict, metric: str):
    """A trained, empty IndexIVFPQ (behind an OPQMatrix if a rotation is given)."""
    C, B = params["centroids"], params["codebooks"]
    nlist, d = C.shape
    M, ksub, dsub = B.shape
    assert M * dsub == d, "codebooks must tile the dimension"
    nbits = int(np.log2(ksub))
    codebooks = np.ascontiguousarray(B, dtype=np.float32).ravel()
    if "flat" in params:
        ivf = faiss.IndexPQ(d, M, nbits, faiss_metric(metric))
        faiss.copy_array_to_vector(codebooks, ivf.pq.centroids)
        ivf.is_trained = True
    else:
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        quantizer.add(np.ascontiguousarray(C, dtype=np.float32))
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, M, nbits, faiss_metric(metric))
        faiss.copy_array_to_vector(codebooks, ivf.pq.centroids)
        ivf.is_trained = True
        ivf.own_fields = True
        quantizer.this.disown()
        if metric == "l2":
            ivf.precompute_table()
    rotation = params.get("rotation")
    if rotation is None:
        return ivf
    opq = opq_matrix(rotation, M)
    index = faiss.IndexPreTransform(opq, ivf)
    index.own_fields = True
    ivf.this.disown()
    opq.this.disown()
    return index


def opq_matrix(rotation: np.ndarray, M: int) -> faiss.OPQMatrix:
    """A trained OPQMatrix applying x @ rotation.T."""
    opq = faiss.OPQMatrix(rotation.shape[1], M)
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation, dtype=np.float32).ravel(), opq.A)
    opq.is_trained = True
    return opq


def set_nprobe(index, nprobe: int) -> None:
    """Sets nprobe on an IVF index; a flat PQ index has no lists and ignores it."""
    if not isinstance(faiss.downcast_index(_inner(index)), faiss.IndexPQ):
        faiss.extract_index_ivf(index).nprobe = nprobe


def bytes_per_vector(cfg: IndexConfig) -> int:
    return cfg.M * cfg.nbits // 8
