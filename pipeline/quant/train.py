"""Pure training kernel: one data-parallel epoch of listwise distillation.

Workers see equal slices of the same global batch; `reduce_grads` (a callable passed in by the
caller, identity for one worker) sums gradients across workers. Losses are sums divided by the
*global* batch size, so summed gradients equal the single-process gradient of the global batch,
and every worker applies the same update.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config import LRSchedule, TrainConfig
from pipeline.quant.losses import ListLosses
from pipeline.quant.model import Student, similarity


@dataclass
class TrainData:
    """Training queries in memory. Any object with the same `pool`, `steps(B)` and
    `batches(B, seed, epoch, rank, world)` can stand in for it (the pipeline streams them from
    Parquet: pipeline.data.teacher_stream)."""
    xq: np.ndarray  # (n, d) float32 training queries
    pos: np.ndarray  # (n, K, d) float16/32 teacher top-K neighbour vectors
    pool: np.ndarray  # (P, d) float32 random corpus vectors for negatives
    labeled: np.ndarray | None = None  # (n, d) each query's labeled document (contrastive)

    def steps(self, batch_size: int) -> int:
        return len(self.xq) // batch_size  # the ragged tail is dropped

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
        """Per step, in a seeded order, full batches only: the global batch's queries (B, d),
        and this worker's slice [rank * B / world, (rank + 1) * B / world) of it: queries,
        neighbour vectors (b, K, d), labeled documents (b, d) or None."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.xq))
        local = batch_size // world
        for step in range(self.steps(batch_size)):
            idx = np.sort(order[step * batch_size:(step + 1) * batch_size])
            mine = idx[rank * local:(rank + 1) * local]
            yield self.xq[idx], self.xq[mine], self.pos[mine], \
                None if self.labeled is None else self.labeled[mine]


LOSS_TERMS = ("pq", "ivf", "recon", "balance", "contrastive")


def _spread(t: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """Rows computed for the filled slots `slots` of n, then the rest, laid out as all n slots
    (empty ones zero) then the rest."""
    if len(slots) == n:
        return t
    return torch.cat([t.new_zeros(n, t.shape[1]).index_copy(0, slots, t[:len(slots)]),
                      t[len(slots):]])


def _dropped(filled: torch.Tensor, slots: torch.Tensor, N: int,
             in_batch: bool) -> torch.Tensor | None:
    """Candidates a query must not score, (b, K + N [+ len(slots)]), or None: its empty slots
    and, among the in-batch candidates (the filled slots `slots` of every list, flattened),
    its own neighbours (they must not reappear as negatives)."""
    if not in_batch and filled.all():
        return None
    b, K = filled.shape
    drop = torch.zeros(b, K + N + (len(slots) if in_batch else 0), dtype=torch.bool,
                       device=filled.device)
    drop[:, :K] = ~filled
    if in_batch:
        owner = torch.div(slots, K, rounding_mode="floor")
        drop[:, K + N:] = owner[None] == torch.arange(b, device=filled.device)[:, None]
    return drop


def _top_copies(t: torch.Tensor, drop: torch.Tensor | None, K: int,
                top: int) -> torch.Tensor:
    """The candidates of t (b, L) a query must not score: `drop` (None: nothing) and, past
    its own K slots, every candidate that scores at or above its own `top`-th best neighbour:
    a copy of one of its top neighbours (another query's neighbour, or a negative that
    happens to be one), since the exact top has no other document that scores so high. Kept,
    a copy would sit below the neighbour in the teacher's order, and the ranking loss would
    push the same document under itself. Copies are scored by another kernel (a matrix
    product, not the lists' batched one): a relative 1e-5 leaves room for the rounding."""
    own = t[:, :K] if drop is None else t[:, :K].masked_fill(drop[:, :K], -torch.inf)
    thr = own.topk(top, 1).values[:, -1:]
    # a query with fewer than `top` neighbours has nothing to copy: no threshold
    thr = torch.where(torch.isfinite(thr), thr - 1e-5 * thr.abs(), torch.inf)
    copies = torch.zeros_like(t, dtype=torch.bool)
    copies[:, K:] = t[:, K:] >= thr
    return copies if drop is None else drop | copies


def _log_weights(slot_weights: torch.Tensor | None, t: torch.Tensor,
                 K: int) -> torch.Tensor | None:
    """Log of how many documents each of the candidates t (b, L) stands for: slot_weights
    (K,) for a query's own K slots, 1 for everything else (negatives stand for themselves)."""
    if slot_weights is None:
        return None
    if slot_weights.shape != (K,):
        raise ValueError(f"teacher lists of {K} neighbours, but the teacher config makes lists "
                         f"of {len(slot_weights)} (teacher.k + the band's slots): train with "
                         "the teacher.* the lists were drawn with")
    log_w = torch.zeros_like(t)
    log_w[:, :K] = slot_weights.log()
    return log_w


def unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the distinct rows of x, for every row of x the index of its copy among them), or
    (x, None) when all rows differ.

    A batch's documents repeat: a neighbour of several similar queries, a list negative two
    queries in one list both drew, a shared negative that is also someone's neighbour. At the
    defaults about a quarter of the rows quantized in a step are copies, and quantizing is
    most of a step's cost (the (M, n, 256) codeword scores), so each document is quantized
    once and its copies gathered from it. The value is the same; so is the gradient (a
    gather's backward sums its copies' gradients, as the copies' own passes would).

    Rows are keyed by the bits of a few of their coordinates, in integer arithmetic (a
    matrix product would not do: equal rows can round differently at different places in a
    product). The grouping is checked against the whole rows; where keys collide (rows equal
    in those coordinates only), torch.unique groups them exactly, at several times the cost."""
    if len(x) < 2:
        return x, None
    cols = torch.linspace(0, x.shape[1] - 1, min(x.shape[1], 16), device=x.device).long()
    # float32 bits (float16 widens exactly; float64 rounds, which the check below catches)
    bits = x.index_select(1, cols).float().contiguous().view(torch.int32).to(torch.int64)
    # factors below 2^27: 16 products of 32-bit words sum below 2^63, with no overflow
    factors = torch.randint(1, 1 << 27, (len(cols),), generator=torch.Generator().manual_seed(0))
    keys, again = torch.unique((bits * factors.to(x.device)).sum(1), return_inverse=True)
    if len(keys) == len(x):  # equal rows have equal keys: all rows differ
        return x, None
    first = torch.full((len(keys),), len(x), dtype=torch.int64, device=x.device)
    first.scatter_reduce_(0, again, torch.arange(len(x), device=x.device), "amin")
    distinct = x.index_select(0, first)
    if not torch.equal(distinct.index_select(0, again), x):
        distinct, again = torch.unique(x, dim=0, return_inverse=True)
        if len(distinct) == len(x):
            return x, None
    return distinct, again


def _quantize_once(model: Student, docs: torch.Tensor, R: torch.Tensor | None,
                   with_logits: bool) -> tuple:
    """(rotated, coarse lists, reconstructions, soft-assignment logits or None) of docs
    (n, d), each distinct document rotated and quantized once (unique_rows) and its copies
    gathered with index_select (whose backward is an index_add, not indexing's sorted put)."""
    kept, again = unique_rows(docs)
    kept_rot = model.rotate(kept, R)
    lists = model.assign(kept_rot)
    c, r_hat, _, *rest = model.quantize(kept_rot, with_logits, lists)
    x_hat = c + r_hat
    logits = rest[0] if with_logits else None
    if again is None:
        return kept_rot, lists, x_hat, logits
    kept_rot, lists, x_hat = (t.index_select(0, again) for t in (kept_rot, lists, x_hat))
    return kept_rot, lists, x_hat, \
        None if logits is None else [lg.index_select(0, again) for lg in logits]


def _regularizers(model: Student, kept_rot: torch.Tensor, x_kept: torch.Tensor,
                  logits: list[torch.Tensor] | None, b: int, K: int, nf: int, N: int,
                  cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """KDindex's reconstruction and balance terms over the quantized documents (the nf
    filled neighbour slots, then the N negatives, then any labeled ones): kept_rot rotated,
    x_kept reconstructed; logits the soft assignments (None: no balance term). Sums over the
    local queries, so that, like the KL sums, workers' parts add up exactly: the squared
    error of a query's neighbours (their mean) plus the negatives' mean."""
    zero = torch.zeros((), device=kept_rot.device)
    err = ((kept_rot - x_kept) ** 2).sum(1)
    recon = err[:nf].sum() / K + (b * err[nf:nf + N].mean() if N else zero)
    if logits is None:
        return recon, zero
    rows = slice(nf, nf + N) if N else slice(0, nf)  # the pool negatives: the corpus's spread
    return recon, b * model.balance_loss(kept_rot[rows], [lg[rows] for lg in logits],
                                         cfg.sinkhorn_iters, model.soft_temperature)


def batch_loss(model: Student, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
               cfg: TrainConfig, in_batch: bool,
               labeled: torch.Tensor | None = None,
               slot_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss sums over a local batch, one per term of LOSS_TERMS.

    q (b, d); pos (b, K, d) each query's teacher neighbours, best first; neg (N, d) shared
    negatives; labeled (b, d) each query's labeled document, or None; slot_weights (K,) how
    many documents each neighbour slot stands for (knn.Band.slot_weights), or None: all 1.
    Candidates of query i: its K neighbours, the shared negatives, and (in_batch) the other
    queries' neighbours (as negatives: each stands for itself). Every document is rotated and
    quantized once however many lists it is in (unique_rows), empty slots never.
    """
    b, K, d = pos.shape
    N = len(neg)
    # Empty slots of a teacher list are NaN vectors (a band with fewer drawn neighbours than
    # slots, a corpus smaller than k): zeroed for the arithmetic, masked out of every score.
    filled = torch.isfinite(pos).all(-1)  # (b, K)
    pos = torch.where(filled[..., None], pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
    R = model.rotation() if model.has_rotation else None
    q_rot = model.rotate(q, R)
    extra = [neg] + ([labeled] if labeled is not None else [])
    docs = torch.cat([pos.reshape(b * K, d)] + extra)
    # Only the filled slots are rotated and quantized (with the default band about a quarter
    # of the slots are empty), each document once; _spread lays the results out as docs.
    slots = filled.reshape(-1).nonzero()[:, 0]
    nf = len(slots)
    balance = cfg.balance_weight > 0
    kept_rot, lists_kept, x_kept, logits = _quantize_once(
        model, torch.cat([pos.reshape(b * K, d)[slots]] + extra), R, balance)
    x_hat = _spread(x_kept, slots, b * K)
    zero = torch.zeros((), device=q.device)
    out = dict.fromkeys(LOSS_TERMS, zero)
    out["recon"], out["balance"] = _regularizers(model, kept_rot, x_kept, logits, b, K, nf, N,
                                                 cfg)

    in_batch = in_batch and b > 1

    def candidates(vectors: torch.Tensor, filled_slots: torch.Tensor,
                   query: torch.Tensor) -> torch.Tensor:
        """Scores (b, L) of each query to its own list's slots and the negatives (among
        `vectors`, laid out as docs; the losses leave out what the teacher's list drops) and,
        in_batch, to every list's filled slots (`filled_slots` (nf, d))."""
        s = [similarity(query, vectors[:b * K].view(b, K, d), model.metric),
             similarity(query, vectors[b * K:b * K + N], model.metric)]
        if in_batch:
            s.append(similarity(query, filled_slots, model.metric))
        return torch.cat(s, 1)

    t = candidates(docs, docs[slots], q)
    top = min(cfg.rank_top or K, K)
    drop = _top_copies(t, _dropped(filled, slots, N, in_batch), K, top)
    lists = ListLosses(t.masked_fill(drop, -torch.inf), cfg.temperature, cfg.kl_temperature,
                       top, _log_weights(slot_weights, t, K))

    def objective(s: torch.Tensor) -> torch.Tensor:
        total = zero
        if cfg.loss.ranking:
            total = total + lists.ranking(s)
        if cfg.loss.kl:  # kl_weight balances the two losses' scales when combined
            total = total + (cfg.kl_weight if cfg.loss.ranking else 1.0) * lists.kl(s)
        return total

    s_pq = candidates(x_hat, x_kept[:nf], q_rot)
    out["pq"] = objective(s_pq)
    if cfg.ivf_weight > 0 and model.centroids.requires_grad:
        # A candidate's coarse score is its list's: gathered from the (b, nlist) query-to-
        # centroid scores rather than scored vector by vector (one product of b x nlist).
        coarse = model.coarse_scores(q_rot)
        own = _spread(lists_kept[:, None], slots, b * K)[:b * K, 0]
        # index_select, not coarse[:, idx]: its backward is an index_add, not a sorted put
        s_ivf = [coarse.gather(1, own.view(b, K)), coarse.index_select(1, lists_kept[nf:nf + N])]
        batch = [coarse.index_select(1, lists_kept[:nf])] if in_batch else []
        out["ivf"] = objective(torch.cat(s_ivf + batch, 1))
    if labeled is not None and cfg.contrastive_weight > 0:
        lab = similarity(q_rot, x_hat[b * K + N:][:, None], model.metric)[:, 0]
        out["contrastive"] = lists.contrastive(lab, s_pq)
    return out


def total_loss(parts: dict[str, torch.Tensor], cfg: TrainConfig, recon0: float) -> torch.Tensor:
    """The weighted sum of batch_loss's terms (still a sum over the local queries)."""
    return (parts["pq"] + cfg.ivf_weight * parts["ivf"]
            + cfg.recon_weight * parts["recon"] / recon0
            + cfg.balance_weight * parts["balance"]
            + cfg.contrastive_weight * parts["contrastive"])


def make_optimizer(model: Student, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the learned parameters. Codebook and centroid steps are cfg.lr (rq_lr) in
    units of model.step_unit (see calibrate); the rotation's are in radians."""
    lr = (cfg.rq_lr if model.residual else cfg.lr) * model.step_unit
    # Adam's epsilon scales as 1 / the data's scale, like the gradients it is added to, so
    # that data 128 times larger trains the same (test_training_is_scale_free). It is 1e-8
    # for unit-norm vectors.
    groups = [{"params": [p for p in (model.centroids, model.codebooks) if p.requires_grad],
               "lr": lr, "eps": 1e-8 / model.data_norm}]
    if model.skew.requires_grad:
        groups.append({"params": [model.skew], "lr": cfg.rotation_lr})
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    for group in opt.param_groups:  # what the schedule scales; the backoff shrinks it
        group["base_lr"] = group["lr"]
    return opt


def schedule(opt: torch.optim.Optimizer, kind: LRSchedule, progress: float) -> None:
    """Sets every group's learning rate for the point `progress` in [0, 1] of the training:
    its base rate (the backoff's, once it backed off) times the schedule's factor."""
    factor = 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) \
        if kind == LRSchedule.COSINE else 1.0
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


class NegativeSampler:
    """The shared corpus negatives of each step, drawn from the sample pool.

    Draws depend on (seed, epoch, step), the global batch and the model only, which every
    worker holds identically, so all workers draw the same negatives.
    - "random": uniform over the pool.
    - "ivf": Distill-VQ's IVF-aware negatives: pool vectors in the lists that the batch's
      queries probe (their `ivf_negative_nprobe` best lists under the current centroids),
      i.e. the documents the index will actually compare against the query's neighbours.
      The pool's lists are refreshed at every epoch start; too few fill up with random ones.
    """

    def __init__(self, pool: np.ndarray, cfg: TrainConfig):
        self.pool, self.cfg = pool, cfg
        self.lists = None  # (P,) list of every pool vector, for "ivf"

    def start_epoch(self, model: Student, device: str) -> None:
        if self.cfg.negative_sampler != "ivf" or not model.spec.ivf or not self.cfg.negatives:
            return
        self.lists = _pool_lists(model, self.pool, device)

    def draw(self, model: Student, xq: np.ndarray, epoch: int, step: int,
             device: str) -> np.ndarray:
        n = min(self.cfg.negatives, len(self.pool))
        rng = np.random.default_rng([self.cfg.seed, epoch, step])
        if self.lists is None or not n:
            return self.pool[rng.choice(len(self.pool), size=n, replace=False)]
        with torch.no_grad():
            q = model.rotate(torch.as_tensor(xq, dtype=torch.float32, device=device))
            probe = min(self.cfg.ivf_negative_nprobe, model.centroids.shape[0])
            probed = model.coarse_scores(q).topk(probe, 1).indices.unique().cpu().numpy()
        near = np.flatnonzero(np.isin(self.lists, probed))
        take = near[rng.choice(len(near), size=min(n, len(near)), replace=False)]
        if len(take) < n:
            rest = np.setdiff1d(np.arange(len(self.pool)), take)
            take = np.concatenate([take, rng.choice(rest, size=n - len(take), replace=False)])
        return self.pool[np.sort(take)]


@torch.no_grad()
def _pool_lists(model: Student, pool: np.ndarray, device: str) -> np.ndarray:
    """(P,) the coarse list of every pool vector under the current student."""
    R = model.rotation() if model.has_rotation else None
    return np.concatenate([model.assign(model.rotate(torch.as_tensor(
        pool[i:i + 8192], dtype=torch.float32, device=device), R)).cpu().numpy()
        for i in range(0, len(pool), 8192)])


class ListNegatives:
    """Each query's list negatives: cfg.list_negatives pool vectors drawn uniformly from the
    list it probes first under the current student.

    With one list probed, a query's top 100 is decided among that list's documents alone,
    and all but its teacher neighbours there lie past the teacher list's depth; the shared
    and in-batch candidates lie mostly in other lists. These are the documents the codes
    must rank below the neighbours at that point. Appended to a query's own slots, after
    its teacher neighbours, they are scored exactly like them (their teacher scores are the
    exact ones), so the KL orders them and the ranking loss keeps them below the top.

    A draw at or above the query's `top`-th neighbour is a copy of one of its top documents
    (or, for a corpus pseudo-query, itself) and is left out (an empty, NaN slot). The pool's
    lists are re-assigned every REFRESH steps, as the centroids move. Draws depend on
    (seed, epoch, step), the query itself and the model, which every worker holds
    identically: the same queries draw the same vectors on any number of workers."""

    # Steps between re-assignments of the pool: the lists move as the centroids learn, and a
    # re-assignment scores the whole pool against every centroid.
    REFRESH = 50

    def __init__(self, pool: np.ndarray, cfg: TrainConfig):
        self.pool, self.n, self.seed = pool, cfg.list_negatives, cfg.seed
        self.order = self.starts = self.counts = None

    def refresh(self, model: Student, device: str) -> None:
        lists = _pool_lists(model, self.pool, device)
        self.order = np.argsort(lists, kind="stable")
        self.counts = np.bincount(lists, minlength=model.centroids.shape[0])
        self.starts = np.cumsum(self.counts) - self.counts

    def draw(self, model: Student, q: torch.Tensor, pos: torch.Tensor, top: int, epoch: int,
             step: int) -> torch.Tensor:
        """(b, n, d) list negatives of the local queries q (b, d); pos (b, K, d) their
        teacher lists."""
        if self.order is None or step % self.REFRESH == 0:
            self.refresh(model, q.device.type)
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


def train_epoch(model: Student, opt: torch.optim.Optimizer, data: TrainData,
                cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1,
                reduce_grads: Callable[[list[torch.Tensor]], None] = lambda grads: None,
                device: str = "cpu", log: Callable[[int, int, float], None] | None = None,
                after_step: Callable[[int, int], None] | None = None,
                slot_weights: np.ndarray | None = None) -> dict:
    """One pass over data.batches(...) in global batches of cfg.batch_size, of which this
    worker trains on its own share (B / world queries). `after_step(step, steps)` runs after
    every optimizer step (mid-epoch validation). slot_weights: batch_loss's.

    Returns the per-query average of the loss and of each term ("loss_pq", "loss_ivf", ...)
    over the epoch, "steps", "queries", and "step_losses", the loss of every step.
    """
    B = cfg.batch_size
    assert B % world == 0, "global batch must split evenly across workers"
    local = B // world
    steps = data.steps(B)
    params = [p for p in model.parameters() if p.requires_grad]
    recon0 = model.recon_scale
    sampler = NegativeSampler(data.pool, cfg)
    sampler.start_epoch(model, device)
    near = ListNegatives(data.pool, cfg) if cfg.list_negatives and model.spec.ivf \
        and len(data.pool) else None
    if slot_weights is not None:
        slot_weights = torch.as_tensor(slot_weights, dtype=torch.float32, device=device)
        if near is not None:  # a list negative stands for itself
            slot_weights = torch.cat([slot_weights, slot_weights.new_ones(cfg.list_negatives)])
    totals = dict.fromkeys(LOSS_TERMS, 0.0)
    total = 0.0
    step_losses = []
    model.train()
    step = 0
    for xq_b, q_mine, pos_mine, lab_mine in data.batches(B, cfg.seed, epoch, rank, world):
        if step >= steps:
            break
        assert len(xq_b) == B and len(q_mine) == local, "every step takes a full global batch"
        q = torch.as_tensor(q_mine, dtype=torch.float32, device=device)
        pos = torch.as_tensor(pos_mine.astype(np.float32), device=device)
        lab = None if lab_mine is None else torch.as_tensor(
            lab_mine.astype(np.float32), device=device)
        neg = torch.as_tensor(sampler.draw(model, xq_b, epoch, step, device),
                              dtype=torch.float32, device=device)
        if near is not None:
            pos = torch.cat([pos, near.draw(model, q, pos, cfg.rank_top or pos.shape[1], epoch,
                                            step)], 1)
        parts = batch_loss(model, q, pos, neg, cfg, cfg.in_batch, lab, slot_weights)
        loss = total_loss(parts, cfg, recon0) / B
        opt.zero_grad(set_to_none=False)
        loss.backward()
        reduce_grads([p.grad for p in params])
        opt.step()
        for k in LOSS_TERMS:
            totals[k] += float(parts[k].item()) / B
        total += float(loss.item())
        step_losses.append(float(loss.item()) * world)  # this worker's share, per query
        step += 1
        if log is not None:
            log(step, steps, float(loss.item()) * world)
        if after_step is not None:
            after_step(step, steps)
    steps = step
    scale = world / max(steps, 1)  # per-query averages (this worker's share x world)
    out = {f"loss_{k}": v * scale for k, v in totals.items()}
    return {"loss": total * scale, **out, "steps": steps, "queries": steps * B,
            "step_losses": step_losses}


@torch.no_grad()
def calibrate(model: Student, x: np.ndarray) -> None:
    """Sets the model's scales from a corpus sample x (n, d) at the warm start.

    recon_scale: the mean squared reconstruction error per vector. data_norm: the RMS vector
    norm (the unit of Adam's epsilon). step_unit: the RMS size of
    a coordinate times the relative reconstruction error, so that learning rates mean the
    same on any data scale (an Adam step moves a codeword coordinate by about lr) and shrink
    as the code gets finer: the closer the warm start is to the data, the smaller the step
    that can still improve it.
    """
    model.recon_scale = max(reconstruction_error(model, x), 1e-12)
    sq_norm = max(float((x.astype(np.float64) ** 2).sum(1).mean()), 1e-12)
    model.data_norm = float(np.sqrt(sq_norm))
    model.step_unit = float(np.sqrt(sq_norm / x.shape[1])) * model.recon_scale / sq_norm


@torch.no_grad()
def reconstruction_error(model: Student, x: np.ndarray) -> float:
    """Mean squared reconstruction error of x (n, d) under the model."""
    xr = model.rotate(torch.as_tensor(x, dtype=torch.float32))
    c, r_hat, _ = model.quantize(xr)
    return float(((xr - c - r_hat) ** 2).sum(1).mean())
