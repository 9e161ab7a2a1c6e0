"""Distillation objectives over a per-query candidate list (teacher scores vs student scores)."""
from __future__ import annotations

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
