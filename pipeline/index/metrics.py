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


def score_rows(I_by_nprobe: dict, gt: np.ndarray, qids: np.ndarray, qrels: dict | None,
               base_row: dict) -> list[dict]:
    """One report row per nprobe: base_row plus recall@10/100 against gt and, with labels,
    MRR@10 and label recall@10."""
    rows = []
    for nprobe, I in sorted(I_by_nprobe.items()):
        rows.append({
            **base_row, "nprobe": nprobe,
            "recall_at_10": overlap_recall(I, gt, 10),
            "recall_at_100": overlap_recall(I, gt, 100) if gt.shape[1] >= 100 else None,
            "mrr_at_10": mrr_at(I, qids, qrels, 10) if qrels else None,
            "label_recall_at_10": label_recall_at(I, qids, qrels, 10) if qrels else None,
        })
    return rows
