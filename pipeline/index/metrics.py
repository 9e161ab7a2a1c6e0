"""Retrieval quality metrics."""
from __future__ import annotations

import numpy as np


def query_recalls(I: np.ndarray, gt: np.ndarray, k: int) -> np.ndarray:
    """k@k recall of each query (n,): the fraction of its exact top-k in its returned top-k."""
    assert I.shape[1] >= k and gt.shape[1] >= k, "need at least k results and k true neighbours"
    return np.array([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(I, gt)])


def overlap_recall(I: np.ndarray, gt: np.ndarray, k: int) -> float:
    """k@k recall: mean fraction of the exact top-k found in the returned top-k."""
    return float(query_recalls(I, gt, k).mean()) if len(I) else 0.0


def mrr_at(I: np.ndarray, qids: np.ndarray, qrels: dict, k: int = 10) -> float:
    total = 0.0
    for row, q in zip(I[:, :k], qids):
        rel = qrels.get(int(q), ())
        for rank, doc in enumerate(row):
            if doc in rel:
                total += 1.0 / (rank + 1)
                break
    return total / len(I)


def label_recall_at(I: np.ndarray, qids: np.ndarray, qrels: dict, k: int = 10) -> float:
    total = 0.0
    for row, q in zip(I[:, :k], qids):
        rel = qrels.get(int(q), set())
        if rel:
            total += len(rel.intersection(row.tolist())) / len(rel)
    return total / len(I)
