"""Pure training kernel: one data-parallel epoch of listwise distillation.

Workers see equal slices of the same global batch; `reduce_grads` (a callable passed in by the
caller, identity for one worker) sums gradients across workers. Losses are sums divided by the
*global* batch size, so summed gradients equal the single-process gradient of the global batch,
and every worker applies the same update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.quant.losses import listwise_kl, relative_tau
from pipeline.quant.model import IVFPQStudent


@dataclass
class TrainData:
    """Training queries in memory. Any object with the same `pool`, `steps(B)` and
    `batches(B, seed, epoch)` can stand in for it (the pipeline streams them from Parquet)."""
    xq: np.ndarray  # (n, d) float32 training queries
    pos: np.ndarray  # (n, K, d) float16/32 teacher top-K neighbour vectors
    pool: np.ndarray  # (P, d) float32 random corpus vectors for negatives

    def steps(self, batch_size: int) -> int:
        return len(self.xq) // batch_size  # the ragged tail is dropped

    def batches(self, batch_size: int, seed: int, epoch: int):
        """Global batches (xq (B, d), pos (B, K, d)) in a seeded order, full batches only."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.xq))
        for step in range(self.steps(batch_size)):
            idx = np.sort(order[step * batch_size:(step + 1) * batch_size])
            yield self.xq[idx], self.pos[idx]


def exact_scores(q: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact similarity of queries to docs: x (n, d) -> (nq, n); x (nq, L, d) -> (nq, L)."""
    if x.dim() == 3:
        s = torch.einsum("bd,bld->bl", q, x)
        return s if metric == "ip" else 2 * s - (x * x).sum(-1) - (q * q).sum(1, keepdim=True)
    s = q @ x.T
    return s if metric == "ip" else 2 * s - (x * x).sum(1)[None] - (q * q).sum(1)[:, None]


def batch_loss(model: IVFPQStudent, q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
               cfg: TrainConfig, in_batch: bool):
    """Loss sums (pq part, ivf part, reconstruction part) for a local batch.

    q (b, d); pos (b, K, d) each query's teacher neighbours; neg (N, d) shared negatives.
    Candidates of query i: its K neighbours, the shared negatives, and (in_batch) the other
    queries' neighbours.
    """
    b, K, d = pos.shape
    shared = neg
    if in_batch and b > 1:
        shared = torch.cat([neg, pos.reshape(b * K, d)], 0)
    R = model.rotation() if model.has_rotation else None
    q_rot = model.rotate(q, R)
    docs = torch.cat([pos.reshape(b * K, d), shared], 0)
    docs_rot = model.rotate(docs, R)
    c, r_hat, _ = model.quantize(docs_rot)
    x_hat = c + r_hat
    # Squared reconstruction error as a sum over local queries (its neighbours' mean plus the
    # shared negatives' mean), so that, like the KL sums, workers' parts add up exactly.
    err = ((docs_rot - x_hat) ** 2).sum(1)
    loss_recon = err[:b * K].sum() / K
    if len(neg):
        loss_recon = loss_recon + b * err[b * K:b * K + len(neg)].mean()

    def candidate_scores(fn_pos, fn_shared):
        s = torch.cat([fn_pos, fn_shared], 1)
        if in_batch and b > 1:  # a query's own neighbours must not reappear as negatives
            own = torch.zeros(b, s.shape[1], dtype=torch.bool, device=s.device)
            own[:, K + len(neg):] = torch.eye(b, dtype=torch.bool, device=s.device)\
                .repeat_interleave(K, dim=1)
            s = s.masked_fill(own, -torch.inf)
        return s

    t = candidate_scores(exact_scores(q, pos, model.metric), exact_scores(q, shared, model.metric))
    tau = relative_tau(t, cfg.temperature)
    n_pos = b * K
    s_pq = candidate_scores(
        exact_scores(q_rot, x_hat[:n_pos].view(b, K, d), model.metric),
        model.score(q_rot, x_hat[n_pos:]),
    )
    loss_pq = listwise_kl(t, s_pq, tau)
    loss_ivf = torch.zeros((), device=q.device)
    if cfg.ivf_weight > 0 and model.centroids.requires_grad:
        s_ivf = candidate_scores(
            exact_scores(q_rot, c[:n_pos].view(b, K, d), model.metric),
            model.score(q_rot, c[n_pos:]),
        )
        loss_ivf = listwise_kl(t, s_ivf, tau)
    return loss_pq, loss_ivf, loss_recon


def make_optimizer(model: IVFPQStudent, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in (model.centroids, model.codebooks) if p.requires_grad],
               "lr": cfg.lr}]
    if model.skew.requires_grad:
        groups.append({"params": [model.skew], "lr": cfg.rotation_lr})
    return torch.optim.Adam([g for g in groups if g["params"]])


def _negatives(pool: np.ndarray, n: int, seed: int, epoch: int, step: int) -> np.ndarray:
    # Seeded by (seed, epoch, step) alone, so every worker draws the same negatives.
    rng = np.random.default_rng([seed, epoch, step])
    return pool[rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


def train_epoch(model: IVFPQStudent, opt: torch.optim.Optimizer, data: TrainData,
                cfg: TrainConfig, epoch: int, rank: int = 0, world: int = 1,
                reduce_grads: Callable[[list[torch.Tensor]], None] = lambda grads: None,
                device: str = "cpu", log: Callable[[int, int, float], None] | None = None,
                max_steps: int = 0) -> dict:
    """One pass over data.batches(...) in global batches of cfg.batch_size; this worker
    trains on its slice [rank * B / world, (rank + 1) * B / world) of each.

    Returns {"loss", "loss_pq", "loss_ivf", "steps", "queries"} averaged over the epoch, and
    "step_losses", the loss of every step.
    """
    B = cfg.batch_size
    assert B % world == 0, "global batch must split evenly across workers"
    local = B // world
    steps = data.steps(B)
    if max_steps:
        steps = min(steps, max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    recon0 = model.recon_scale
    totals = np.zeros(2)
    step_losses = []
    model.train()
    step = 0
    for xq_b, pos_b in data.batches(B, cfg.seed, epoch):
        if step >= steps:
            break
        assert len(xq_b) == B, "every step takes a full global batch"
        q = torch.as_tensor(xq_b[rank * local:(rank + 1) * local], dtype=torch.float32,
                            device=device)
        pos = torch.as_tensor(pos_b[rank * local:(rank + 1) * local].astype(np.float32),
                              device=device)
        neg = torch.as_tensor(_negatives(data.pool, cfg.negatives, cfg.seed, epoch, step),
                              dtype=torch.float32, device=device)
        loss_pq, loss_ivf, loss_recon = batch_loss(model, q, pos, neg, cfg, cfg.in_batch)
        loss = (loss_pq + cfg.ivf_weight * loss_ivf + cfg.recon_weight * loss_recon / recon0) / B
        opt.zero_grad(set_to_none=False)
        loss.backward()
        reduce_grads([p.grad for p in params])
        opt.step()
        totals += [loss_pq.item() / B, loss_ivf.item() / B]
        step_losses.append(float(loss.item()) * world)  # this worker's share, per query
        step += 1
        if log is not None:
            log(step, steps, float(loss.item()))
    steps = step
    totals = totals * world / max(steps, 1)  # per-query averages (this worker's share x world)
    return {"loss_pq": float(totals[0]), "loss_ivf": float(totals[1]),
            "loss": float(totals[0] + cfg.ivf_weight * totals[1]), "steps": steps,
            "queries": steps * B, "step_losses": step_losses}


@torch.no_grad()
def reconstruction_error(model: IVFPQStudent, x: np.ndarray) -> float:
    """Mean squared reconstruction error of x (n, d) under the model."""
    xr = model.rotate(torch.as_tensor(x, dtype=torch.float32))
    c, r_hat, _ = model.quantize(xr)
    return float(((xr - c - r_hat) ** 2).sum(1).mean())
