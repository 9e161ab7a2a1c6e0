"""The student: a differentiable IVF + PQ or IVF + RQ (additive) quantizer, optionally behind a
learned orthogonal rotation.

Knows nothing of distribution or devices: the caller moves it and reduces its gradients.

Shapes: d dimension, nlist coarse centroids, M sub-quantizers of ksub codewords.
- PQ: codebooks (M, ksub, d / M); sub-vector m of the residual picks a codeword of book m.
- RQ: codebooks (M, ksub, d); stage m quantizes what stages < m left over, greedily (faiss's
  ResidualQuantizer with a beam of 1), and the reconstruction is the sum of the M codewords.
Rotation convention matches faiss's OPQMatrix: x_rot = x @ R.T.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.config import Quantizer
from pipeline.index.params import Params
from pipeline.quant.losses import sinkhorn_balance


def similarity(q: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """Higher is closer: q.x for "ip", -||q - x||^2 for "l2" (expanded, so no (nq, n, d)
    tensor is built). q (nq, d); x (n, d) gives (nq, n), x (nq, L, d) gives (nq, L)."""
    if x.dim() == 3:
        s, xx = torch.einsum("bd,bld->bl", q, x), (x * x).sum(-1)
    else:
        s, xx = q @ x.T, (x * x).sum(1)[None]
    return s if metric == "ip" else 2 * s - xx - (q * q).sum(1, keepdim=True)


class _PQStraightThrough(torch.autograd.Function):
    """Every sub-quantizer's hard codeword, with the gradient of a soft assignment: the same
    values and gradients as Student._straight_through on PQ distances, fused by hand.

    Autograd's version of that chain keeps many (n, M, ksub) temporaries and passes over
    them (distance terms, scale, logits, softmax, their backward), and it builds the soft
    mixture in the forward pass only to subtract it again; on CPUs those passes, not the
    matrix products, took most of the quantization's time. Here the forward pass is one batched
    product and an in-place softmax, and the backward pass four batched products.

    r (M, n, dsub) residual sub-vectors, B (M, ksub, dsub) codebooks, temperature > 0 (relative
    to each sub-vector's mean squared distance to the codewords). Returns hard (M, n, dsub) and
    codes (M, n).

    With p = softmax(-dist / (temperature * mean dist)) the straight-through output is
    B[code] + p @ B - stop_gradient(p @ B), so for the output's gradient g:
      dB[code] += g,  dB += p^T g,  and through the logits (w = 2 d logits / (T s)):
      dr = w @ B,  dB += w^T r - colsum(w) * B
    (the ||r||^2 term of the distance drops out: a softmax's logit gradients sum to zero).
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, B: torch.Tensor, temperature: float):
        half_norms = 0.5 * (B * B).sum(-1)  # (M, ksub)
        r_norms = (r * r).sum(-1, keepdim=True)  # (M, n, 1)
        # mean distance to the codewords, without the (M, n, ksub) distances themselves
        mean_dist = r_norms - 2 * torch.bmm(r, B.mean(1, keepdim=True).transpose(1, 2)) \
            + 2 * half_norms.mean(-1)[:, None, None]
        inv = 2.0 / (temperature * mean_dist.clamp_min(1e-12))  # (M, n, 1)
        # logits up to a per-row constant (-||r||^2 / (T s)), which the softmax ignores
        logits = torch.bmm(r, B.transpose(1, 2)).sub_(half_norms[:, None, :]).mul_(inv)
        # The softmax in place, from the row maxima that also give the codes: half the passes
        # over the (M, n, ksub) scores of argmax and torch.softmax, and no second tensor.
        top, codes = logits.max(-1, keepdim=True)
        p = logits.sub_(top).exp_()
        p.div_(p.sum(-1, keepdim=True))
        codes = codes[..., 0]
        hard = torch.gather(B, 1, codes[..., None].expand(-1, -1, B.shape[2]))
        ctx.save_for_backward(r, B, p, codes, inv)
        ctx.mark_non_differentiable(codes)
        return hard, codes

    @staticmethod
    def backward(ctx, g: torch.Tensor, _codes_grad):
        r, B, p, codes, inv = ctx.saved_tensors
        g = g.contiguous()
        # d loss / d logits of a softmax: p * (dp - <p, dp>), then times d logits / d r.B
        w = torch.bmm(g, B.transpose(1, 2))
        w.sub_((w * p).sum(-1, keepdim=True)).mul_(p).mul_(inv)
        grad_r = torch.bmm(w, B) if ctx.needs_input_grad[0] else None
        grad_B = None
        if ctx.needs_input_grad[1]:
            grad_B = torch.bmm(p.transpose(1, 2), g)  # the soft mixture's codeword weights
            grad_B.scatter_add_(1, codes[..., None].expand(-1, -1, B.shape[2]), g)  # hard pick
            grad_B += torch.bmm(w.transpose(1, 2), r) - w.sum(1)[..., None] * B
        return grad_r, grad_B, None


class Student(nn.Module):
    def __init__(self, params: Params, metric: str = "ip", learn_ivf: bool = True,
                 learn_pq: bool = True, learn_rotation: bool = True,
                 soft_temperature: float = 0.05):
        super().__init__()
        assert metric in ("ip", "l2"), "metric must be ip or l2"
        self.metric = metric
        self.soft_temperature = soft_temperature
        self.spec = params.spec
        C = torch.as_tensor(np.asarray(params.centroids, dtype=np.float32))
        B = torch.as_tensor(np.asarray(params.codebooks, dtype=np.float32))
        self.residual = params.spec.kind == Quantizer.RQ
        # A flat PQ/OPQ/RQ student has one zero centroid that never moves.
        self.centroids = nn.Parameter(C.clone(), requires_grad=learn_ivf and params.spec.ivf)
        self.codebooks = nn.Parameter(B.clone(), requires_grad=learn_pq)
        rotation = params.rotation
        self.has_rotation = rotation is not None
        d = C.shape[1]
        R0 = torch.as_tensor(np.asarray(rotation, dtype=np.float32)) if self.has_rotation \
            else torch.eye(d)
        self.register_buffer("rotation0", R0.clone())
        # R = cayley(A - A^T) @ R0 stays orthogonal whatever the optimizer does to A, so the
        # rotation never changes the teacher's geometry (q.d == Rq.Rd).
        # Set by the caller from a corpus sample (pipeline.quant.train.calibrate): the warm
        # start's reconstruction error per vector, which makes the reconstruction term
        # scale-free, and the unit of the codebook/centroid learning rates.
        self.recon_scale = 1.0
        self.step_unit = 1.0
        self.data_norm = 1.0  # the sample's RMS vector norm: Adam's epsilon is in its units
        learn_rot = learn_rotation and self.has_rotation
        self.skew = nn.Parameter(torch.zeros(d, d), requires_grad=learn_rot)

    @property
    def M(self) -> int:
        return self.codebooks.shape[0]

    def rotation(self) -> torch.Tensor:
        if not self.skew.requires_grad:
            return self.rotation0
        # The Cayley transform (I - S/2)^-1 (I + S/2) of the skew-symmetric S is orthogonal and
        # agrees with expm(S) to second order (the steps keep S small). Its forward and
        # backward passes are a linear solve each: 11 ms at d = 384, where the matrix
        # exponential's took 132 ms (its backward is the exponential of a 2d x 2d matrix).
        S = self.skew - self.skew.T
        eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
        return torch.linalg.solve(eye - S / 2, eye + S / 2) @ self.rotation0

    def rotate(self, x: torch.Tensor, R: torch.Tensor | None = None) -> torch.Tensor:
        if not self.has_rotation:
            return x
        return x @ (self.rotation() if R is None else R).T

    def coarse_scores(self, x_rot: torch.Tensor) -> torch.Tensor:
        """Score of each vector for each list, higher is closer, as faiss's flat quantizer
        ranks them: (n, nlist)."""
        return similarity(x_rot, self.centroids, self.metric)

    def assign(self, x_rot: torch.Tensor) -> torch.Tensor:
        """Coarse list of each vector: (n,) int64."""
        with torch.no_grad():
            return self.coarse_scores(x_rot).argmax(1)

    def _pick(self, dist: torch.Tensor, book: torch.Tensor):
        """Hard codewords for squared distances dist (n, ksub) to book (ksub, k): the forward
        value, with a straight-through soft assignment for the gradient, plus codes and
        the soft assignment's logits (for balancing)."""
        codes = dist.argmin(-1)
        hard, logits = self._straight_through(dist, book[codes], lambda p: p @ book)
        return hard, codes, logits

    def _straight_through(self, dist: torch.Tensor, hard: torch.Tensor, mix):
        """The hard codewords as the forward value, with the gradient of a soft assignment:
        softmax(-dist) at soft_temperature relative to the mean distance (scale-free), turned
        into vectors by mix(p). Returns (value, logits)."""
        scale = dist.detach().mean(-1, keepdim=True).clamp_min(1e-12)
        logits = -dist / (max(self.soft_temperature, 1e-6) * scale)
        if self.soft_temperature > 0:
            soft = mix(torch.softmax(logits, dim=-1))
            hard = hard + soft - soft.detach()
        return hard, logits

    def quantize(self, x_rot: torch.Tensor, with_logits: bool = False,
                 lists: torch.Tensor | None = None):
        """(coarse centroid (n, d), quantized residual (n, d), codes (n, M)) and, with
        `with_logits`, the soft-assignment logits of every sub-quantizer [(n, ksub)] * M.
        `lists`: the vectors' coarse lists when the caller has them (self.assign(x_rot)).

        Forward values are the hard (faiss) reconstruction. Gradients reach the chosen
        codewords directly and, through a straight-through soft assignment, the residual.
        Distances to codewords use the expanded form ||r||^2 - 2 r.c + ||c||^2: no
        (n, ksub, dsub) tensor is built.
        """
        lists = self.assign(x_rot) if lists is None else lists
        c = self.centroids[lists]
        r = x_rot - c
        B = self.codebooks
        parts, codes, logits = [], [], []
        if self.residual:
            left = r
            for m in range(self.M):
                dist = ((left * left).sum(1, keepdim=True) - 2 * left @ B[m].T
                        + (B[m] * B[m]).sum(1)[None])
                hard, code, logit = self._pick(dist, B[m])
                left = left - hard
                parts.append(hard)
                codes.append(code)
                logits.append(logit)
            r_hat = torch.stack(parts, 0).sum(0)
        elif not with_logits and self.soft_temperature > 0:
            # every sub-quantizer at once, fused (_PQStraightThrough); r_m (M, n, dsub)
            rm = r.view(r.shape[0], self.M, -1).transpose(0, 1).contiguous()
            hard, code = _PQStraightThrough.apply(rm, B, self.soft_temperature)
            r_hat = hard.transpose(0, 1).reshape(r.shape)
            codes = list(code.unbind(0))
        else:  # all sub-quantizers at once: (n, M, ksub) distances, by autograd
            rm = r.view(r.shape[0], self.M, -1)
            dist = ((rm * rm).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", rm, B)
                    + (B * B).sum(-1)[None])
            code = dist.argmin(-1)
            hard = B[torch.arange(self.M, device=r.device)[None, :], code]  # (n, M, dsub)
            hard, logit = self._straight_through(
                dist, hard, lambda p: torch.einsum("nmk,mkd->nmd", p, B))
            r_hat = hard.reshape(r.shape)
            codes, logits = list(code.unbind(1)), list(logit.unbind(1))
        out = (c, r_hat, torch.stack(codes, 1))
        return out + (logits,) if with_logits else out

    def balance_loss(self, x_rot: torch.Tensor, logits: list[torch.Tensor], iters: int,
                     coarse_temperature: float) -> torch.Tensor:
        """KDindex's balance term, summed over vectors: cross-entropy of each soft assignment
        (the coarse lists when they are learned, and every sub-quantizer's codewords) to its
        Sinkhorn-Knopp balanced transport plan, which uses every list and codeword equally."""
        terms = [sinkhorn_balance(lg, iters) for lg in logits] if self.codebooks.requires_grad \
            else []
        if self.centroids.requires_grad:
            s = self.coarse_scores(x_rot)
            spread = s.detach().std(1, keepdim=True).clamp_min(1e-12)
            terms.append(sinkhorn_balance(s / (coarse_temperature * spread), iters))
        if not terms:
            return torch.zeros((), device=x_rot.device)
        return torch.stack(terms).sum() / len(terms)

    def score(self, q_rot: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Similarity (higher is better) of every query to every reconstruction: (nq, n)."""
        return similarity(q_rot, x_hat, self.metric)

    def export(self) -> Params:
        """Parameters for pipeline.index.build.index_from_params (numpy, float32)."""
        def numpy(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float32)

        with torch.no_grad():
            return Params(self.spec, numpy(self.centroids), numpy(self.codebooks),
                          numpy(self.rotation()) if self.has_rotation else None)

