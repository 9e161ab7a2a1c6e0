"""The student: a differentiable IVF + PQ or IVF + additive (RQ, LSQ) quantizer, optionally
behind a learned orthogonal rotation.

Knows nothing of distribution or devices: the caller moves it and reduces its gradients.

Shapes: d dimension, nlist coarse centroids, M sub-quantizers of ksub codewords.
- PQ: codebooks (M, ksub, d / M); sub-vector m of the residual picks a codeword of book m.
- RQ: codebooks (M, ksub, d); stage m quantizes what stages < m left over, greedily (faiss's
  ResidualQuantizer with a beam of 1), and the reconstruction is the sum of the M codewords.
- LSQ: RQ's codebooks and reconstruction, but the M codes are chosen jointly, as faiss's
  LocalSearchQuantizer encodes: from the greedy codes, ICM sweeps re-pick each code with the
  other M - 1 fixed (each sweep lowers the reconstruction error or keeps it).
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
    product, the row maxima (the codes) and an exponential in place; the backward pass is
    five batched products and two passes over the scores.

    r (M, n, dsub) residual sub-vectors, B (M, ksub, dsub) codebooks, temperature > 0 (relative
    to each sub-vector's mean squared distance to the codewords). Returns hard (M, n, dsub) and
    codes (M, n).

    With c = 1 / (temperature * mean dist) and p = softmax(-c dist), the straight-through output
    is B[code] + p @ B - stop_gradient(p @ B), so for the output's gradient g:
      dB[code] += g,  dB += p^T g,  and through the logits (w = 2c d logits):
      dr = w @ B,  dB += w^T r - colsum(w) * B
    (the ||r||^2 term of the distance drops out: a softmax's logit gradients sum to zero).
    p is kept unnormalized, e = Z p, and 1 / Z folded into the small (M, n, dsub) factors.
    """

    @staticmethod
    def forward(ctx, r: torch.Tensor, B: torch.Tensor, temperature: float):
        sq = (B * B).sum(-1)  # (M, ksub)
        r_sq = (r * r).sum(-1, keepdim=True)  # (M, n, 1)
        # mean distance to the codewords, without the (M, n, ksub) distances themselves
        mean_dist = r_sq - 2 * torch.bmm(r, B.mean(1, keepdim=True).transpose(1, 2)) \
            + sq.mean(-1)[:, None, None]
        c = 1.0 / (temperature * mean_dist.clamp_min(1e-12))  # (M, n, 1)
        # the logits -c ||r - B_k||^2 = [2c r, -c, -c ||r||^2] . [B_k, ||B_k||^2, 1]: one
        # product, no pass to scale or shift them
        logits = torch.bmm(torch.cat([r * (2 * c), -c, -c * r_sq], -1),
                           torch.cat([B, sq[..., None], torch.ones_like(sq)[..., None]],
                                     -1).transpose(1, 2))
        top, codes = logits.max(-1, keepdim=True)
        # A logit is minus a scaled distance, so at most 0 (up to rounding), and a row's
        # largest is at least -1 / temperature (the nearest codeword is no farther than the
        # mean): at the default 0.05 the exponentials neither overflow nor vanish without
        # subtracting the row maxima, a pass over the (M, n, ksub) scores. Rows outside that
        # window (a much lower temperature, degenerate distances) have them subtracted.
        if not bool(((top >= -30) & (top <= 1)).all()):
            logits.sub_(top)
        e = logits.exp_()
        inv_z = e.sum(-1, keepdim=True).reciprocal_()  # (M, n, 1)
        codes = codes[..., 0]
        hard = torch.gather(B, 1, codes[..., None].expand(-1, -1, B.shape[2]))
        ctx.save_for_backward(r, B, e, codes, inv_z, 2 * c * inv_z)
        ctx.mark_non_differentiable(codes)
        return hard, codes

    @staticmethod
    def backward(ctx, g: torch.Tensor, _codes_grad):
        r, B, e, codes, inv_z, f = ctx.saved_tensors
        # w = 2c p (dp - <p, dp>), dp = g B^T: the softmax's logit gradient times 2c. The
        # factor 2c / Z goes on g, and <p, dp> = <g, e B> / Z is a product over dsub.
        gf = g * f  # (M, n, dsub)
        w = torch.bmm(gf, B.transpose(1, 2))
        w.sub_((gf * torch.bmm(e, B)).sum(-1, keepdim=True).mul_(inv_z)).mul_(e)
        grad_r = torch.bmm(w, B) if ctx.needs_input_grad[0] else None
        grad_B = None
        if ctx.needs_input_grad[1]:
            # Products that sum over the n rows are formed as (X^T Y)^T: on CPUs twice as fast
            # as X^T Y with the long (M, n, ksub) operand transposed.
            grad_B = torch.bmm((g * inv_z).transpose(1, 2), e).transpose(1, 2)  # p^T g
            grad_B = grad_B.contiguous().scatter_add_(  # the hard pick
                1, codes[..., None].expand(-1, -1, B.shape[2]), g)
            # [w^T r, colsum(w)] from one product, r with a column of ones
            wr = torch.bmm(torch.cat([r, r.new_ones(r.shape[:2] + (1,))], -1).transpose(1, 2),
                           w).transpose(1, 2)
            grad_B += wr[..., :-1] - wr[..., -1:] * B
        return grad_r, grad_B, None


# ICM sweeps after the greedy codes when an LSQ student encodes in training (Student._icm_codes)
ICM_SWEEPS = 3


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
        self.additive = params.spec.kind.additive
        self.joint = params.spec.kind == Quantizer.LSQ
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
        # Set by the caller from a corpus sample (pipeline.quant.loop.calibrate): the warm
        # start's reconstruction error per vector, which makes the reconstruction term
        # scale-free, and the unit of the codebook/centroid learning rates.
        self.recon_scale = 1.0
        self.step_unit = 1.0
        self.data_norm = 1.0  # the sample's RMS vector norm: Adam's epsilon is in its units
        learn_rot = learn_rotation and self.has_rotation
        self.skew = nn.Parameter(torch.zeros(d, d), requires_grad=learn_rot)

    @property
    def device(self) -> torch.device:
        """Where its parameters are: every tensor it meets must be there too."""
        return self.codebooks.device

    @property
    def M(self) -> int:
        return self.codebooks.shape[0]

    def rotation(self) -> torch.Tensor:
        if not self.skew.requires_grad:
            return self.rotation0
        # The Cayley transform (I - S/2)^-1 (I + S/2) of the skew-symmetric S is orthogonal and
        # agrees with expm(S) to second order (the steps keep S small). Its forward and
        # backward passes are a linear solve each, where the matrix exponential's backward is
        # the exponential of a 2d x 2d matrix.
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

    def _icm_codes(self, r: torch.Tensor, B: torch.Tensor,
                   sweeps: int = ICM_SWEEPS) -> torch.Tensor:
        """Joint codes (n, M) of the residuals r under the additive codebooks B: the greedy
        (residual) codes, then `sweeps` sweeps that each re-pick code m as the nearest
        codeword to what the other codes leave over. faiss's LSQ encoder runs the same sweeps
        from random starts with perturbations (16 x 4 sweeps): lower errors, at 16 times the
        sweeps. Training on its codes instead reached the same validation recall
        (docs/method.md); faiss encodes the index itself (pipeline.index.build)."""
        with torch.no_grad():
            B = B.detach()
            sq = (B * B).sum(-1)  # (M, ksub)
            codes = torch.empty(r.shape[0], self.M, dtype=torch.int64, device=r.device)
            left = r.detach().clone()
            for m in range(self.M):
                codes[:, m] = (sq[m][None] - 2 * left @ B[m].T).argmin(1)
                left -= B[m].index_select(0, codes[:, m])
            for _ in range(sweeps):
                for m in range(self.M):
                    left += B[m].index_select(0, codes[:, m])
                    codes[:, m] = (sq[m][None] - 2 * left @ B[m].T).argmin(1)
                    left -= B[m].index_select(0, codes[:, m])
        return codes

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
        # index_select, not indexing: its backward is an index_add, not a sorted put
        c = self.centroids.index_select(0, lists)
        r = x_rot - c
        B = self.codebooks
        parts, codes, logits = [], [], []
        if self.joint:
            codes = self._icm_codes(r, B)
            hard_all = [B[m].index_select(0, codes[:, m]) for m in range(self.M)]
            total = torch.stack(hard_all, 0).sum(0)
            for m in range(self.M):
                # what code m quantizes once the others are fixed; its soft assignment over
                # that target carries the gradient, the ICM code is the value
                left = r - (total - hard_all[m])
                dist = ((left * left).sum(1, keepdim=True) - 2 * left @ B[m].T
                        + (B[m] * B[m]).sum(1)[None])
                hard, logit = self._straight_through(dist, hard_all[m],
                                                     lambda p, book=B[m]: p @ book)
                parts.append(hard)
                logits.append(logit)
            codes = list(codes.unbind(1))
            r_hat = torch.stack(parts, 0).sum(0)
        elif self.additive:
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

