"""The student: a differentiable IVF-PQ (optionally behind a learned orthogonal rotation).

Knows nothing of distribution or devices: the caller moves it and reduces its gradients.

Shapes: d dimension, nlist coarse centroids, M sub-quantizers of ksub codewords, dsub = d / M.
Rotation convention matches faiss's OPQMatrix: x_rot = x @ R.T.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class IVFPQStudent(nn.Module):
    def __init__(self, params: dict, metric: str = "ip", learn_ivf: bool = True,
                 learn_pq: bool = True, learn_rotation: bool = True,
                 soft_temperature: float = 0.1):
        super().__init__()
        assert metric in ("ip", "l2"), "metric must be ip or l2"
        self.metric = metric
        self.soft_temperature = soft_temperature
        C = torch.as_tensor(np.asarray(params["centroids"], dtype=np.float32))
        B = torch.as_tensor(np.asarray(params["codebooks"], dtype=np.float32))
        # A flat PQ/OPQ student has one zero centroid that never moves.
        self.flat = "flat" in params
        self.centroids = nn.Parameter(C.clone(), requires_grad=learn_ivf and not self.flat)
        self.codebooks = nn.Parameter(B.clone(), requires_grad=learn_pq)
        rotation = params.get("rotation")
        self.has_rotation = rotation is not None
        d = C.shape[1]
        R0 = torch.as_tensor(np.asarray(rotation, dtype=np.float32)) if self.has_rotation \
            else torch.eye(d)
        self.register_buffer("rotation0", R0.clone())
        # R = expm(A - A^T) @ R0 stays orthogonal whatever the optimizer does to A, so the
        # rotation never changes the teacher's geometry (q.d == Rq.Rd).
        # Reconstruction error per vector at the warm start, set by the caller; it makes the
        # reconstruction term scale-free.
        self.recon_scale = 1.0
        learn_rot = learn_rotation and self.has_rotation
        self.skew = nn.Parameter(torch.zeros(d, d), requires_grad=learn_rot)

    @property
    def M(self) -> int:
        return self.codebooks.shape[0]

    def rotation(self) -> torch.Tensor:
        if not self.skew.requires_grad:
            return self.rotation0
        A = self.skew - self.skew.T
        return torch.linalg.matrix_exp(A) @ self.rotation0

    def rotate(self, x: torch.Tensor, R: torch.Tensor | None = None) -> torch.Tensor:
        if not self.has_rotation:
            return x
        return x @ (self.rotation() if R is None else R).T

    def assign(self, x_rot: torch.Tensor) -> torch.Tensor:
        """Coarse list of each vector, as faiss's flat quantizer picks it: (n,) int64."""
        with torch.no_grad():
            C = self.centroids
            if self.metric == "ip":
                return (x_rot @ C.T).argmax(1)
            return ((C * C).sum(1)[None] - 2 * x_rot @ C.T).argmin(1)

    def _codeword_distances(self, r: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances of residual sub-vectors to codewords: (n, M, ksub).

        The expanded form ||r||^2 - 2 r.c + ||c||^2 avoids an (n, M, ksub, dsub) tensor.
        """
        B = self.codebooks
        rm = r.view(r.shape[0], self.M, -1)
        cross = torch.einsum("nmd,mkd->nmk", rm, B)
        return (rm * rm).sum(-1, keepdim=True) - 2 * cross + (B * B).sum(-1)[None]

    def quantize(self, x_rot: torch.Tensor):
        """(coarse centroid (n, d), quantized residual (n, d), codes (n, M)).

        Forward values are the hard (faiss) reconstruction. Gradients reach the chosen
        codewords directly and, through a straight-through soft assignment, the residual.
        """
        lists = self.assign(x_rot)
        c = self.centroids[lists]
        r = x_rot - c
        dist = self._codeword_distances(r)
        codes = dist.argmin(-1)
        B = self.codebooks
        m_idx = torch.arange(self.M, device=r.device)[None, :]
        hard = B[m_idx, codes]  # (n, M, dsub)
        if self.soft_temperature > 0:
            scale = dist.detach().mean(-1, keepdim=True).clamp_min(1e-12)
            p = torch.softmax(-dist / (self.soft_temperature * scale), dim=-1)
            soft = torch.einsum("nmk,mkd->nmd", p, B)
            hard = hard + soft - soft.detach()
        return c, hard.reshape(r.shape), codes

    def score(self, q_rot: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Similarity (higher is better) of every query to every reconstruction: (nq, n)."""
        s = q_rot @ x_hat.T
        if self.metric == "ip":
            return s
        return 2 * s - (x_hat * x_hat).sum(1)[None] - (q_rot * q_rot).sum(1)[:, None]

    def export(self) -> dict:
        """Parameters for pipeline.index.build.index_from_params (numpy, float32)."""
        with torch.no_grad():
            out = {
                "centroids": self.centroids.detach().cpu().numpy().astype(np.float32),
                "codebooks": self.codebooks.detach().cpu().numpy().astype(np.float32),
            }
            if self.flat:
                out["flat"] = np.array(1)
            if self.has_rotation:
                out["rotation"] = self.rotation().detach().cpu().numpy().astype(np.float32)
        return out
