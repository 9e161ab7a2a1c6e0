"""Exact top-k search over one corpus block, and the merge of per-block results.

Scores are "higher is better" for both metrics (l2 results are negated squared distances), so
per-shard results merge the same way whatever the metric.

With a `Band`, a result is the exact top k plus a sample of the deeper ranks k+1..depth: each
of those is drawn when a hash of (query id, document id) falls below size / (depth - k). The
hash is the same on every shard, so a shard keeps vectors only for its own drawn candidates
(about `size` per query, not `depth`), and merging shards' results gives exactly the draw of
a search over the whole corpus. A document's global rank is known only after the merge, so
results also carry each query's top-`depth` scores (4 bytes each, no vectors): the cut-off.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import InputError

log = logging.getLogger("ivf_distill.index.knn")


@dataclass(frozen=True)
class Band:
    """Draws about `size` neighbours per query from ranks k+1..`depth` (see the module doc)."""
    k: int
    depth: int
    size: int
    seed: int = 0

    @staticmethod
    def of(teacher) -> "Band | None":
        """The band a TeacherConfig asks for (drawn with its seed), or None."""
        return Band(teacher.k, teacher.band_depth, teacher.band_size, teacher.seed) \
            if teacher.band_size else None

    def __post_init__(self):
        if not 0 < self.size < self.depth - self.k:
            raise InputError(f"a band of {self.size} drawn from ranks {self.k + 1}..{self.depth} "
                             "needs 0 < size < depth - k")

    @property
    def rate(self) -> float:
        return self.size / (self.depth - self.k)

    def slot_weights(self) -> np.ndarray:
        """(k + width,): how many of the query's top `depth` documents each slot of a finished
        list stands for. The top k stand for themselves; a drawn neighbour, drawn with
        probability `rate`, for 1 / rate of its ranks (a Horvitz-Thompson weight), so that
        weighted sums over a list estimate sums over the whole top `depth`."""
        return np.concatenate([np.ones(self.k), np.full(self.width, 1 / self.rate)])

    @property
    def width(self) -> int:
        """Slots for drawn neighbours in a finished result: the count is binomial with mean
        `size`; two standard deviations above it overflow for about 2% of queries, which then
        keep the drawn neighbours with the smallest keys (still a uniform draw)."""
        return self.size + math.ceil(2 * math.sqrt(self.size))

    def keys(self, qids: np.ndarray, I: np.ndarray) -> np.ndarray:
        """(nq, L) uniform draw keys in [0, 1) of (query id, document id) pairs; 1 where I is
        -1 (never drawn). A splitmix64 finalizer of both ids and the seed."""
        with np.errstate(over="ignore"):
            h = (qids.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
                 ^ I.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)) + np.uint64(self.seed)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return np.where(I >= 0, u, 1.0)


def block_topk(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int, metric: str,
               with_vectors: bool = False, query_block: int = 4096, device: str = "cpu",
               band: Band | None = None, qids: np.ndarray | None = None,
               exclude_self: bool = False):
    """Exact top-k of xq (nq, d) over xb (n, d) whose global ids are `ids` (n,).
    exclude_self: the queries are samples of the corpus; a query's own row is no neighbour.

    device "cpu" searches with faiss; "cuda" with a torch GEMM + top-k on the GPU.
    Returns S (nq, k) float32 scores, I (nq, k) int64 global ids (-1 where xb has fewer than k
    rows) and, if asked, V (nq, k, d) neighbour vectors (with_vectors: True for float16, or a
    dtype name such as "float32" for coordinates beyond float16's range; NaN where I is -1: training
    masks such slots, and no corpus vector is NaN, ingest checks).

    With a `band` (and the queries' ids `qids`) it returns a partial result (S, I, V, U, T):
    the top k, then every drawn neighbour in rank order (as many columns as the query with
    the most), empty slots as above; U their draw keys and T (nq, depth) the top-depth
    scores, which merge_topk needs. `finish` makes it the final (S, I, V).
    """
    S, L = _search(xq, xb, band.depth if band else k, metric, query_block, device,
                   exclude_self)
    I = np.where(L >= 0, ids[np.maximum(L, 0)], -1)
    U = T = None
    if band is not None:
        T = S
        S, I, U, cols = _select(S, I, band.keys(qids, I), T, band)
        L = np.where(cols >= 0, np.take_along_axis(L, np.maximum(cols, 0), 1), -1)
    V = None
    if with_vectors:
        dtype = np.float16 if with_vectors is True else np.dtype(with_vectors)
        V = xb[np.maximum(L, 0)].astype(dtype)
        V[L < 0] = np.nan
    return (S, I, V) if band is None else (S, I, V, U, T)


def _search(xq: np.ndarray, xb: np.ndarray, k: int, metric: str, query_block: int,
            device: str, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(S, L): the top-k scores (higher is better) and rows of xb, -inf and -1 past its end.
    exclude_self: the queries are corpus samples (pseudo-queries), and each one's own row,
    the first row of xb equal to it, is no neighbour (see without_self)."""
    nq, d = xq.shape
    search = _torch_search(xb, metric, device)
    kk = min(k + exclude_self, len(xb))
    S = np.full((nq, k), -np.inf, dtype=np.float32)
    L = np.full((nq, k), -1, dtype=np.int64)
    for i0 in range(0, nq, query_block):
        q = np.ascontiguousarray(xq[i0:i0 + query_block], dtype=np.float32)
        D, rows = search(q, kk)
        D = D if metric == "ip" else -D
        if exclude_self:
            D, rows = without_self(q, xb, D, rows, metric)
        n = min(k, D.shape[1])
        S[i0:i0 + len(q), :n] = D[:, :n]
        L[i0:i0 + len(q), :n] = rows[:, :n]
    return S, L


def without_self(q: np.ndarray, xb: np.ndarray, D: np.ndarray, rows: np.ndarray,
                 metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The hits (D, rows) (nq, k) with each query's own row taken out, the rest moved up and
    the last slot emptied: its own row is the first hit bit-equal to the query (of two rows
    with one vector either may go; they are the same document to the teacher). Only the
    hits that score about what a copy scores (q.q for ip, 0 for l2's negated distances, to a
    thousandth of q.q: the search's rounding) are compared with the query: gathering every
    hit's vector would take a block of 4,096 queries x 300 hits x d floats (1.9 GB at d =
    384).

    A corpus sample used as a training query finds itself first, with a score no held-out
    query ever has (1 for unit vectors; 0.84 on average for the next on the shared data), and
    the distillation learns that outlier instead of the neighbourhood (docs/method.md: what
    we tried). One copy
    goes, as if the sample had been taken out of the corpus: another document with the same
    vector is a neighbour like any other."""
    norms = (q.astype(np.float64) ** 2).sum(1, keepdims=True)
    maybe = (rows >= 0) & (np.abs(D - (norms if metric == "ip" else 0)) <= 1e-3 * norms)
    r, c = np.nonzero(maybe)
    same = np.zeros_like(maybe)
    same[r, c] = (xb[rows[r, c]] == q[r]).all(1)
    own = same & (np.cumsum(same, 1) == 1)
    order = np.argsort(own, 1, kind="stable")  # the own row last, the others in their order
    D, rows = np.take_along_axis(D, order, 1), np.take_along_axis(rows, order, 1)
    last = own.any(1)
    D[last, -1], rows[last, -1] = -np.inf, -1
    return D, rows


# The score tile one GEMM fills: queries x corpus rows. Its memory (4 B a score, 128 MiB
# here) stays flat in the shard size, and its top-k merges with the tiles before it.
TILE_QUERIES, TILE_ROWS = 1024, 32768


def _torch_search(xb: np.ndarray, metric: str, device: str):
    """A faiss-like search(q, k) -> (D, L) over xb with torch on `device` (L2: squared): a
    float32 GEMM and top-k per tile of TILE_QUERIES x TILE_ROWS, merged tile by tile. On
    CPUs it beats faiss's flat search at the band's depth (k = 300), whose per-query heaps
    cost more than the GEMM. Inner product needs no norms. Which of several documents tied
    at the k-th score stays in is open (torch.topk's); the kept ones come best first, equal
    scores by row."""
    xb_t = torch.as_tensor(np.ascontiguousarray(xb, dtype=np.float32), device=device)
    norms = (xb_t * xb_t).sum(1) if metric == "l2" else None
    n = len(xb_t)

    def tile_scores(q_t, r0: int):
        s = q_t @ xb_t[r0:r0 + TILE_ROWS].T
        if metric == "l2":  # negated squared distance, so top-k by largest either way
            s = 2 * s - norms[None, r0:r0 + TILE_ROWS] - (q_t * q_t).sum(1, keepdim=True)
        return s

    def search(q: np.ndarray, k: int):
        D_out = np.empty((len(q), k), np.float32)
        L_out = np.empty((len(q), k), np.int64)
        for i0 in range(0, len(q), TILE_QUERIES):
            q_t = torch.as_tensor(np.ascontiguousarray(q[i0:i0 + TILE_QUERIES]), device=device)
            best_s = best_l = None
            for r0 in range(0, n, TILE_ROWS):  # unsorted top-k per tile, sorted once at the end
                s = tile_scores(q_t, r0)
                ts, tl = torch.topk(s, min(k, s.shape[1]), dim=1, sorted=False)
                tl += r0
                if best_s is not None:
                    ts, order = torch.topk(torch.cat([best_s, ts], 1), k, dim=1, sorted=False)
                    tl = torch.gather(torch.cat([best_l, tl], 1), 1, order)
                best_s, best_l = ts, tl
            # Best first; equal scores by row, so that ties break the same way on any device
            # and tiling (torch.topk leaves their order open).
            by_row = torch.argsort(best_l, dim=1)
            best_s, best_l = torch.gather(best_s, 1, by_row), torch.gather(best_l, 1, by_row)
            order = torch.argsort(best_s, dim=1, descending=True, stable=True)
            best_s, best_l = torch.gather(best_s, 1, order), torch.gather(best_l, 1, order)
            D = best_s if metric == "ip" else -best_s
            D_out[i0:i0 + len(q_t)] = D.cpu().numpy()
            L_out[i0:i0 + len(q_t)] = best_l.cpu().numpy()
        return D_out, L_out
    return search


def pick_device(gpus: float) -> str:
    """"cuda" when the caller was given GPUs and torch sees one, else "cpu" (and, when GPUs
    were given, a warning, once per process)."""
    if gpus > 0 and torch.cuda.is_available():
        return "cuda"
    if gpus > 0 and not _warned_cpu:
        _warned_cpu.append(True)
        log.warning("exact top-k: GPUs were asked for (ray.gpus_per_task=%s) but torch sees no "
                    "CUDA device here: searching on the CPU", gpus)
    return "cpu"


_warned_cpu: list = []


def merge_topk(parts: list[tuple], k: int, band: Band | None = None):
    """Merges per-shard (S, I, V-or-None) results into the global top-k, best first; with a
    band, (S, I, V, U, T) results into one of the same form.

    Ties are broken by position in `parts` then rank, so the merge is deterministic.
    """
    if band is not None:
        S, I, U, T = (np.concatenate([p[j] for p in parts], axis=1) for j in (0, 1, 3, 4))
        T = -np.sort(-T, axis=1)[:, :band.depth]
        V = None if parts[0][2] is None else np.concatenate([p[2] for p in parts], axis=1)
        return _apply(S, I, V, U, T, band, None)
    S = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(S))[:, None]
    V = None
    if parts[0][2] is not None:
        V = np.concatenate([p[2] for p in parts], axis=1)[rows, order]
    return S[rows, order], I[rows, order], V


def finish(result: tuple, band: Band | None = None) -> tuple:
    """The final (S, I, V) of a result: with a band, k + band.width columns, the drawn
    neighbours beyond the width dropped, largest keys first. Capping only here keeps a
    distributed draw equal to a search over the whole corpus (partial results also hold
    candidates that a later merge pushes past `depth`)."""
    if band is None:
        return tuple(result[:3])
    return _apply(*result, band, band.width)[:3]


def _apply(S, I, V, U, T, band: Band, width: int | None) -> tuple:
    """_select's columns of (S, I, V, U) and T: a banded result."""
    S, I, U, cols = _select(S, I, U, T, band, width)
    if V is not None:
        V = np.take_along_axis(V, np.maximum(cols, 0)[:, :, None], 1)
        V[cols < 0] = np.nan
    return S, I, V, U, T


def _select(S, I, U, T, band: Band, width: int | None = None):
    """The columns a banded result keeps, of candidates (S, I, U) with top-depth scores T:
    the k best, then the drawn among the rest that rank within `depth` (score at least the
    depth-th best), in rank order: all of them (width None), or at most `width`, the smallest
    keys first. Returns (S, I, U, cols), cols (nq, k + drawn) indices into the candidates, -1
    for empty slots."""
    nq, L = S.shape
    order = np.argsort(-S, axis=1, kind="stable")
    S, I, U = (np.take_along_axis(a, order, 1) for a in (S, I, U))
    cut = T[:, band.depth - 1:band.depth]
    drawn = (np.arange(L)[None] >= band.k) & (U < band.rate) & (S >= cut) & (I >= 0)
    if width is None:
        width = int(drawn.sum(1).max(initial=0))
    by_key = np.argsort(np.where(drawn, U, np.inf), axis=1, kind="stable")[:, :width]
    picked = np.take_along_axis(drawn, by_key, 1)
    pos = np.sort(np.where(picked, by_key, L), axis=1)  # rank order, empty slots last
    pos = np.pad(pos, ((0, 0), (0, width - pos.shape[1])), constant_values=L)
    top = np.pad(np.arange(min(band.k, L)), (0, max(band.k - L, 0)), constant_values=L)
    pos = np.concatenate([np.broadcast_to(top, (nq, band.k)), pos], 1)
    empty = pos >= L
    safe = np.minimum(pos, L - 1)
    S = np.where(empty, -np.inf, np.take_along_axis(S, safe, 1)).astype(np.float32)
    I = np.where(empty, -1, np.take_along_axis(I, safe, 1))
    U = np.where(empty, 1.0, np.take_along_axis(U, safe, 1))
    cols = np.where(empty, -1, np.take_along_axis(order, safe, 1))
    return S, I, U, cols
