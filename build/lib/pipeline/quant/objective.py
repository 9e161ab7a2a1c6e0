"""The batch objective of listwise distillation: each query's candidate list (its teacher
neighbours, the band, shared, in-batch and list negatives), each distinct document quantized
once, and the loss terms.

Losses are sums divided by the *global* batch size, so that the gradients of W workers'
slices, summed, equal the single-process gradient of the global batch.
"""
from __future__ import annotations

import torch

from pipeline.config import LossConfig
from pipeline.errors import InputError
from pipeline.quant.losses import ListLosses
from pipeline.quant.model import Student, similarity

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
        raise InputError(f"teacher lists of {K} neighbours, but the teacher config makes lists "
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
                  cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
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
               cfg: LossConfig, in_batch: bool,
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
        if cfg.kind.ranking:
            total = total + lists.ranking(s)
        if cfg.kind.kl:  # kl_weight balances the two losses' scales when combined
            total = total + (cfg.kl_weight if cfg.kind.ranking else 1.0) * lists.kl(s)
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


def total_loss(parts: dict[str, torch.Tensor], cfg: LossConfig, recon0: float) -> torch.Tensor:
    """The weighted sum of batch_loss's terms (still a sum over the local queries)."""
    return (parts["pq"] + cfg.ivf_weight * parts["ivf"]
            + cfg.recon_weight * parts["recon"] / recon0
            + cfg.balance_weight * parts["balance"]
            + cfg.contrastive_weight * parts["contrastive"])
