"""Distillation objectives over a per-query candidate list (teacher scores vs student scores)."""
from __future__ import annotations

import numpy as np
import torch


class ListLosses:
    """The listwise distillation losses over one batch's candidate lists.

    teacher (nq, L) scores, -inf marks a candidate to ignore. Everything that depends on the
    teacher alone is computed here, once per batch: which candidates count, each query's
    temperatures, the KL's soft targets and the teacher's order of its `top` best. The PQ
    term and the IVF term then pay only for their own side: a few passes over their (nq, L)
    scores, which on CPUs is most of a training step's loss time.

    Temperatures are relative to each query's spread (standard deviation) of teacher scores,
    so scale-free: the same setting serves cosine scores in [-1, 1] and raw L2 distances.
    Student scores given to the methods are (nq, L) and finite; the candidates the teacher
    ignores are ignored. Every loss is a sum over queries, not a mean, so that
    data-parallel workers add their parts exactly.
    """

    def __init__(self, teacher: torch.Tensor, temperature: float, kl_temperature: float,
                 top: int, log_weight: torch.Tensor | None = None):
        teacher = teacher.detach()
        valid = torch.isfinite(teacher)
        # Added to a student's scores, a bias takes the ignored candidates out of a softmax. A
        # row it would empty (a query with no candidate, or none below its top) keeps all of
        # them and its result is masked instead: an all -inf logsumexp has a NaN gradient.
        # log_weight (nq, L), optional: the log of how many documents each candidate stands
        # for (a sampled list standing for a longer one). Every loss then equals the loss of
        # the list with each candidate repeated that many times: in the temperatures' spread
        # and in every softmax, the teacher's and the student's alike.
        self.valid_rows = valid.any(1, keepdim=True)
        self.bias = _bias(valid)
        if log_weight is None:  # the usual case: no pass over the lists for weights of 1
            log_w, w = None, valid.to(teacher.dtype)
        else:
            log_w = log_weight.masked_fill(~valid, 0)
            self.bias += log_w
            w = log_w.exp().masked_fill_(~valid, 0)
        n = w.sum(1, keepdim=True).clamp_min(1e-12)
        t = teacher.masked_fill(~valid, 0)
        mean = (w * t).sum(1, keepdim=True) / n
        spread = ((t - mean).square_().mul_(w).sum(1, keepdim=True) / n).sqrt_()
        self.tau = (temperature * spread).clamp_min(1e-6)
        self.tau_kl = (kl_temperature * spread).clamp_min(1e-6)
        z = teacher / self.tau_kl
        log_pt = torch.log_softmax(z if log_w is None else z + log_w, 1)
        self.pt = log_pt.exp().masked_fill_(~valid, 0)  # a row with no candidate: all 0
        log_pt.masked_fill_(~valid, 0)
        # sum(pt log pt) less the weights' part of the student's log-probabilities (constant)
        self.neg_entropy = (self.pt * (log_pt if log_w is None else log_pt - log_w)).sum()
        self.best = teacher.topk(min(top, teacher.shape[1]), 1).indices  # its order of the top
        self.valid_top = valid.gather(1, self.best)
        below = valid.scatter(1, self.best, False)  # the rest of each list
        self.below_rows = below.any(1, keepdim=True)
        self.below = _bias(below) if log_w is None else _bias(below) + log_w

    def kl(self, student: torch.Tensor) -> torch.Tensor:
        """Distill-VQ's listwise loss: KL(softmax(t / tau_kl) || softmax(s / tau_kl)), as
        sum(pt log pt) - sum(pt z) + logsumexp(z) with z = s / tau_kl (the targets sum to 1
        over a query's candidates), so that no (nq, L) log-ratio is built."""
        z = student / self.tau_kl
        lse = torch.logsumexp(z + self.bias, 1, keepdim=True).masked_fill(~self.valid_rows, 0)
        return self.neg_entropy - (self.pt * z).sum() + lse.sum()

    def ranking(self, student: torch.Tensor) -> torch.Tensor:
        """KDindex's ranking-oriented distillation: the student keeps the teacher's order of
        its `top` best candidates, each above everything the teacher ranks below it (a
        Plackett-Luce likelihood of the teacher's top of the list). For teacher order pi:
        sum over i < top of  logsumexp_{j >= i} s_pi(j) / tau - s_pi(i) / tau."""
        s = student / self.tau
        s_top = s.gather(1, self.best).masked_fill(~self.valid_top, -torch.inf)
        # everything ranked below the top sits in every denominator: one logsumexp, no sort
        tail = torch.logsumexp(s + self.below, 1, keepdim=True).masked_fill(~self.below_rows,
                                                                             -torch.inf)
        rest = torch.logaddexp(torch.logcumsumexp(s_top.flip(1), 1).flip(1), tail)
        return torch.where(self.valid_top, rest - s_top, torch.zeros_like(s_top)).sum()

    def contrastive(self, student_pos: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """InfoNCE against labels: -log softmax of each query's labeled document
        (student_pos (nq,)) among itself and its candidates, at the ranking temperature."""
        logits = torch.cat([student_pos[:, None], student + self.bias], 1) / self.tau
        return -(torch.log_softmax(logits, 1)[:, 0]).sum()


def _bias(keep: torch.Tensor) -> torch.Tensor:
    """0 where `keep`, -inf elsewhere; 0 throughout the rows that keep nothing."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill_(
        ~keep & keep.any(1, keepdim=True), -torch.inf)


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
