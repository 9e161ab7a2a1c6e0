"""Retrieval quality metrics."""
from __future__ import annotations

import time

import faiss
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


METRICS = ("recall_at_10", "recall_at_100", "mrr_at_10", "label_recall_at_10")


def score_sums(I_by_nprobe: dict, gt: np.ndarray, qids: np.ndarray,
               qrels: dict | None) -> dict:
    """{nprobe: {"queries": n, metric: sum over these queries, or None}}: the blocks of a
    query set are scored apart, added up (add_sums) and divided once (rows_from_sums)."""
    n = len(qids)
    return {nprobe: {
        "queries": n,
        "recall_at_10": float(query_recalls(I, gt, 10).sum()),
        "recall_at_100": float(query_recalls(I, gt, 100).sum()) if gt.shape[1] >= 100 else None,
        "mrr_at_10": mrr_at(I, qids, qrels, 10) * n if qrels else None,
        "label_recall_at_10": label_recall_at(I, qids, qrels, 10) * n if qrels else None,
    } for nprobe, I in I_by_nprobe.items()}


def add_sums(total: dict, part: dict) -> dict:
    for nprobe, sums in part.items():
        if nprobe not in total:
            total[nprobe] = dict(sums)
            continue
        for name, v in sums.items():
            total[nprobe][name] = None if v is None else total[nprobe][name] + v
    return total


def rows_from_sums(sums: dict, base_row: dict) -> list[dict]:
    """One report row per nprobe: base_row plus each metric's mean over the queries."""
    rows = []
    for nprobe, s in sorted(sums.items()):
        n = max(s["queries"], 1)
        rows.append({**base_row, "nprobe": nprobe,
                     **{m: None if s[m] is None else s[m] / n for m in METRICS}})
    return rows


def score_rows(I_by_nprobe: dict, gt: np.ndarray, qids: np.ndarray, qrels: dict | None,
               base_row: dict) -> list[dict]:
    """One report row per nprobe: base_row plus recall@10/100 against gt and, with labels,
    MRR@10 and label recall@10."""
    return rows_from_sums(score_sums(I_by_nprobe, gt, qids, qrels), base_row)


def timed_search(index, xq: np.ndarray, k: int) -> tuple[float, int, int]:
    """(seconds, queries, codes scanned) of searching xq on one thread: faiss's IVF counters
    (indexIVF_stats.ndis) count the codes the lists held."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        faiss.cvar.indexIVF_stats.reset()
        t0 = time.perf_counter()
        index.search(np.ascontiguousarray(xq), k)
        seconds = time.perf_counter() - t0
        return seconds, len(xq), int(faiss.cvar.indexIVF_stats.ndis)
    finally:
        faiss.omp_set_num_threads(threads)


def speed_of(parts: list[tuple[float, int, int]]) -> dict:
    """Report fields of the parts' timed searches of the same queries: a query costs what it
    costs in every part (searched one after another on one thread)."""
    seconds = sum(p[0] for p in parts)
    queries = parts[0][1]
    return {"qps_1thread": queries / seconds if seconds > 0 else None,
            "codes_per_query": sum(p[2] for p in parts) / max(queries, 1)}
