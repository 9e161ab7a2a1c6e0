"""Distillation objectives over a per-query candidate list (teacher scores vs student scores)."""
from __future__ import annotations

import numpy as np
import torch


def listwise_kl(teacher: torch.Tensor, student: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Distill-VQ listwise loss, summed over queries: KL(softmax(t/tau) || softmax(s/tau)).

    teacher, student: (nq, L) scores, -inf marks a candidate to ignore; tau: (nq, 1) > 0.
    The sum (not the mean) lets data-parallel workers add their parts exactly.
    """
    valid = torch.isfinite(teacher)
    t = teacher / tau
    s = torch.where(valid, student / tau, torch.full_like(student, -torch.inf))
    log_pt = torch.log_softmax(t, dim=1)
    log_ps = torch.log_softmax(s, dim=1)
    pt = log_pt.exp()
    terms = torch.where(valid, pt * (log_pt - log_ps), torch.zeros_like(pt))
    return terms.sum()


def relative_tau(teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-query temperature: `temperature` times the spread of its teacher scores.

    Scale-free, so the same setting serves cosine scores in [-1, 1] and raw L2 distances.
    """
    valid = torch.isfinite(teacher)
    t = torch.where(valid, teacher, torch.zeros_like(teacher))
    n = valid.sum(1, keepdim=True).clamp_min(1)
    mean = t.sum(1, keepdim=True) / n
    var = (torch.where(valid, (t - mean) ** 2, torch.zeros_like(t))).sum(1, keepdim=True) / n
    return (temperature * var.sqrt()).clamp_min(1e-6).detach()


def ranking_loss(teacher: torch.Tensor, student: torch.Tensor, tau: torch.Tensor,
                 top: int) -> torch.Tensor:
    """KDindex's ranking-oriented distillation, summed over queries: the student keeps the
    teacher's order of its `top` best candidates, each above everything the teacher ranks
    below it (a Plackett-Luce likelihood of the teacher's top of the list).

    For teacher order pi: sum over i < top of  logsumexp_{j >= i} s_pi(j) / tau - s_pi(i) / tau.
    teacher, student: (nq, L), -inf marks a candidate to ignore; tau: (nq, 1) > 0.
    """
    top = min(top, teacher.shape[1])
    best = teacher.topk(top, 1).indices  # the teacher's order of its `top` best
    valid_top = torch.isfinite(teacher.gather(1, best))
    s = student / tau
    s_top = torch.where(valid_top, s.gather(1, best), torch.full_like(best, -torch.inf,
                                                                       dtype=s.dtype))
    # Everything ranked below the top sits in every denominator: one logsumexp, no full sort.
    below = torch.isfinite(teacher).scatter(1, best, False)
    tail = torch.logsumexp(torch.where(below, s, torch.full_like(s, -torch.inf)), 1,
                           keepdim=True)
    rest = torch.logaddexp(torch.logcumsumexp(s_top.flip(1), 1).flip(1), tail)
    terms = torch.where(valid_top, rest - s_top, torch.zeros_like(s_top))
    return terms.sum()


def contrastive(student_pos: torch.Tensor, student: torch.Tensor,
                tau: torch.Tensor) -> torch.Tensor:
    """InfoNCE against labels, summed over queries: -log softmax of each query's labeled
    document (student_pos (nq,)) among itself and its candidates (student (nq, L), -inf
    ignored)."""
    logits = torch.cat([student_pos[:, None], student], 1) / tau
    return -(torch.log_softmax(logits, 1)[:, 0]).sum()


@torch.no_grad()
def sinkhorn_plan(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp: the soft assignment closest to softmax(logits) (n, K) whose rows sum
    to 1 and whose columns each sum to n / K, i.e. every codeword gets an equal share."""
    n, K = logits.shape
    log_q = logits.float() - logits.float().max()
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) + float(np.log(n / K))
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return log_q.exp()


def sinkhorn_balance(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Mean cross-entropy of softmax(logits) to its balanced Sinkhorn plan: pulls vectors
    toward codewords that the batch leaves under-used."""
    plan = sinkhorn_plan(logits, iters)
    return -(plan * torch.log_softmax(logits, 1)).sum(1).mean()
