"""Exact top-k search over one corpus block, and the merge of per-block results.

Scores are "higher is better" for both metrics (l2 results are negated squared distances), so
per-shard results merge the same way whatever the metric.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch


def block_topk(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int, metric: str,
               with_vectors: bool = False, query_block: int = 4096, device: str = "cpu"):
    """Exact top-k of xq (nq, d) over xb (n, d) whose global ids are `ids` (n,).

    device "cpu" searches with faiss; "cuda" with a torch GEMM + top-k on the GPU.
    Returns S (nq, k) float32 scores, I (nq, k) int64 global ids (-1 where xb has fewer than k
    rows) and, if asked, V (nq, k, d) float16 neighbour vectors (zeros where I is -1).
    """
    nq, d = xq.shape
    if device == "cpu":
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(xb, dtype=np.float32))
        search = index.search
    else:
        search = _torch_search(xb, metric, device)
    kk = min(k, len(xb))
    S = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    V = np.zeros((nq, k, d), dtype=np.float16) if with_vectors else None
    for i0 in range(0, nq, query_block):
        q = np.ascontiguousarray(xq[i0:i0 + query_block], dtype=np.float32)
        D, L = search(q, kk)
        S[i0:i0 + len(q), :kk] = D if metric == "ip" else -D
        I[i0:i0 + len(q), :kk] = ids[L]
        if with_vectors:
            V[i0:i0 + len(q), :kk] = xb[L]
    return S, I, V


def _torch_search(xb: np.ndarray, metric: str, device: str):
    """A faiss-like search(q, k) -> (D, L) over xb with torch on `device` (L2: squared)."""
    xb_t = torch.as_tensor(np.ascontiguousarray(xb, dtype=np.float32), device=device)
    norms = (xb_t * xb_t).sum(1)

    def search(q: np.ndarray, k: int):
        q_t = torch.as_tensor(q, device=device)
        s = q_t @ xb_t.T
        if metric == "l2":  # negated squared distance, so top-k by largest either way
            s = 2 * s - norms[None] - (q_t * q_t).sum(1, keepdim=True)
        D, L = torch.topk(s, k, dim=1)
        D = D if metric == "ip" else -D
        return D.cpu().numpy(), L.cpu().numpy()
    return search


def pick_device(gpus: float) -> str:
    """"cuda" when the caller was given GPUs and torch sees one, else "cpu"."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def merge_topk(parts: list[tuple], k: int):
    """Merges per-shard (S, I, V-or-None) results into the global top-k, best first.

    Ties are broken by position in `parts` then rank, so the merge is deterministic.
    """
    S = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(S))[:, None]
    V = None
    if parts[0][2] is not None:
        V = np.concatenate([p[2] for p in parts], axis=1)[rows, order]
    return S[rows, order], I[rows, order], V
