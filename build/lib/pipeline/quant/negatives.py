"""Negatives for the candidate lists: the shared corpus negatives of each step, and list
negatives drawn from the list each query probes first. Draws depend only on what every
worker holds identically, so all workers draw the same."""
from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple

import numpy as np
import torch

from pipeline.config import NegativesConfig
from pipeline.quant.model import Student, similarity

# The (rows, nlist) scores of one chunk of the pool when it is assigned to its lists.
SCORES_BYTES = 64 << 20


class Share(NamedTuple):
    """This worker's place among the data-parallel workers, for work they split: its rank,
    their number, and gather(t), which returns every worker's tensor t in rank order (all
    workers call it together). One worker by default."""
    rank: int = 0
    world: int = 1
    gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None


def shared_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, share: Share,
                device: str = "cpu") -> np.ndarray:
    """fn(x) for a row-wise fn (one value per row), each worker computing it for its
    contiguous share of the rows and gathering the others': every worker gets all of it for
    1 / world of the work."""
    if share.world == 1:
        return fn(x)
    n, world = len(x), share.world
    bounds = [n * r // world for r in range(world + 1)]
    mine = fn(x[bounds[share.rank]:bounds[share.rank + 1]])
    padded = np.zeros(-(-n // world), mine.dtype)  # gathered tensors have one shape
    padded[:len(mine)] = mine
    got = share.gather(torch.from_numpy(padded).to(device))
    return np.concatenate([g.cpu().numpy()[:bounds[r + 1] - bounds[r]]
                           for r, g in enumerate(got)])


class NegativeSampler:
    """The shared corpus negatives of each step, drawn from the sample pool.

    Draws depend on (seed, epoch, step), the global batch and the model only, which every
    worker holds identically, so all workers draw the same negatives.
    - "random": uniform over the pool.
    - "ivf": Distill-VQ's IVF-aware negatives: pool vectors in the lists that the batch's
      queries probe (their `negatives.ivf_nprobe` best lists under the current centroids),
      i.e. the documents the index will actually compare against the query's neighbours.
      The pool's lists are refreshed at every epoch start; too few fill up with random ones.
    """

    def __init__(self, pool: np.ndarray, cfg: NegativesConfig, seed: int,
                 share: Share = Share()):
        self.pool, self.cfg, self.seed, self.share = pool, cfg, seed, share
        self.lists = None  # (P,) list of every pool vector, for "ivf"

    def start_epoch(self, model: Student, device: str) -> None:
        if self.cfg.sampler != "ivf" or not model.spec.ivf or not self.cfg.corpus:
            return
        self.lists = pool_lists(model, self.pool, device, self.share)

    def draw(self, model: Student, xq: np.ndarray, epoch: int, step: int,
             device: str) -> np.ndarray:
        n = min(self.cfg.corpus, len(self.pool))
        rng = np.random.default_rng([self.seed, epoch, step])
        if self.lists is None or not n:
            return self.pool[rng.choice(len(self.pool), size=n, replace=False)]
        with torch.no_grad():
            q = model.rotate(torch.as_tensor(xq, dtype=torch.float32, device=device))
            probe = min(self.cfg.ivf_nprobe, model.centroids.shape[0])
            probed = model.coarse_scores(q).topk(probe, 1).indices.unique().cpu().numpy()
        near = np.flatnonzero(np.isin(self.lists, probed))
        take = near[rng.choice(len(near), size=min(n, len(near)), replace=False)]
        if len(take) < n:
            rest = np.setdiff1d(np.arange(len(self.pool)), take)
            take = np.concatenate([take, rng.choice(rest, size=n - len(take), replace=False)])
        return self.pool[np.sort(take)]


@torch.no_grad()
def pool_lists(model: Student, pool: np.ndarray, device: str,
               share: Share = Share()) -> np.ndarray:
    """(P,) the coarse list of every pool vector under the current student: P x nlist scores,
    split across the workers (shared_rows)."""
    R = model.rotation() if model.has_rotation else None
    rows = max(1, SCORES_BYTES // (4 * model.centroids.shape[0]))

    def assign(x):
        # Into one array allocated up front: a training worker serves large temporaries from
        # its heap (tasks.keep_freed_memory), and results kept between them would split each
        # freed chunk, so that every chunk's scores took fresh memory.
        out = np.empty(len(x), np.int64)
        for i in range(0, len(x), rows):
            out[i:i + rows] = model.assign(model.rotate(torch.as_tensor(
                x[i:i + rows], dtype=torch.float32, device=device), R)).cpu().numpy()
        return out
    return shared_rows(assign, pool, share, device)


class ListNegatives:
    """Each query's list negatives: `n` (negatives.per_list) pool vectors drawn uniformly from the
    list it probes first under the current student.

    With one list probed, a query's top 100 is decided among that list's documents alone,
    and all but its teacher neighbours there lie past the teacher list's depth; the shared
    and in-batch candidates lie mostly in other lists. These are the documents the codes
    must rank below the neighbours at that point. Appended to a query's own slots, after
    its teacher neighbours, they are scored exactly like them (their teacher scores are the
    exact ones), so the KL orders them and the ranking loss keeps them below the top.

    A draw at or above the query's `top`-th neighbour is a copy of one of its top documents
    (or, for a corpus pseudo-query, itself) and is left out (an empty, NaN slot). The pool's
    lists are re-assigned every REFRESH steps, as the centroids move, each worker assigning
its share of the pool. Draws depend on
    (seed, epoch, step), the query itself and the model, which every worker holds
    identically: the same queries draw the same vectors on any number of workers."""

    # Steps between re-assignments of the pool: the lists move as the centroids learn, and a
    # re-assignment scores the whole pool against every centroid.
    REFRESH = 50

    def __init__(self, pool: np.ndarray, n: int, seed: int, share: Share = Share()):
        self.pool, self.n, self.seed, self.share = pool, n, seed, share
        self.order = self.starts = self.counts = None

    def refresh(self, model: Student, device: str) -> None:
        lists = pool_lists(model, self.pool, device, self.share)
        self.order = np.argsort(lists, kind="stable")
        self.counts = np.bincount(lists, minlength=model.centroids.shape[0])
        self.starts = np.cumsum(self.counts) - self.counts

    def draw(self, model: Student, q: torch.Tensor, pos: torch.Tensor, top: int, epoch: int,
             step: int) -> torch.Tensor:
        """(b, n, d) list negatives of the local queries q (b, d); pos (b, K, d) their
        teacher lists."""
        if self.order is None or step % self.REFRESH == 0:
            self.refresh(model, q.device)
        with torch.no_grad():
            lists = model.assign(model.rotate(q)).cpu().numpy()
            # Each query's draw is keyed by its own bytes, not its place in the batch: where
            # it sits in a worker's share depends on how the streams are dealt to the
            # workers. Divided by its largest coordinate, so that data scaled by a power of
            # two draws the same.
            x = q.cpu().numpy()
            x = x / np.maximum(np.abs(x).max(1, keepdims=True), np.finfo(np.float32).tiny)
            u = np.stack([np.random.default_rng([self.seed, epoch, step, int.from_bytes(
                hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")]).random(
                self.n) for row in x])
            counts = self.counts[lists]
            pick = self.starts[lists][:, None] + (u * counts[:, None]).astype(np.int64)
            rows = self.order[np.minimum(pick, len(self.order) - 1)]
            near = torch.as_tensor(self.pool[rows], dtype=torch.float32, device=q.device)
            s = similarity(q, near, model.metric)
            kth = similarity(q, pos[:, min(top, pos.shape[1]) - 1][:, None], model.metric)
            # a missing top-th neighbour (NaN) copies nothing: no threshold
            thr = torch.where(torch.isfinite(kth), kth - 1e-5 * kth.abs(), torch.inf)
            empty = torch.as_tensor(counts == 0, device=q.device)[:, None]
            near[(s >= thr) | empty] = torch.nan
        return near
