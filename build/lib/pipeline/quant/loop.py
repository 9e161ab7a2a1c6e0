"""The optimisation loop of one data-parallel epoch, and what it needs around it: the
training data, the optimiser and its schedule, the step unit (calibration).

Workers see equal slices of the same global batch; `reduce_grads` (a callable passed in by the
caller, identity for one worker) sums gradients across workers, and every worker applies the
same update. The centroids' gradient is row-sparse (a step touches the lists of its batch's
candidates, not all nlist), so it is summed as rows (sum_touched_rows), which keeps the bytes a
step exchanges independent of nlist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config import LossConfig, LRSchedule, NegativesConfig, TrainConfig
from pipeline.quant.model import Student
from pipeline.quant.negatives import ListNegatives, NegativeSampler, Share
from pipeline.quant.objective import LOSS_TERMS, batch_loss, total_loss


@dataclass(frozen=True)
class Recipe:
    """What the training loop reads of the config: the optimisation, the loss and the
    negatives (three sections: pipeline.config)."""
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    negatives: NegativesConfig = NegativesConfig()


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


def make_optimizer(model: Student, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the learned parameters. Codebook and centroid steps are cfg.lr (rq_lr) in
    units of model.step_unit (see calibrate); the rotation's are in radians."""
    lr = (cfg.rq_lr if model.additive else cfg.lr) * model.step_unit
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


def touched_rows(g: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-D gradient that are not all zero (the centroids a step touched)."""
    return torch.nonzero(g.ne(0).any(1)).flatten()


def sum_touched_rows(g: torch.Tensor, gather: Callable[[torch.Tensor], list[torch.Tensor]],
                     reduce: Callable[[torch.Tensor], None]) -> int:
    """Sums a row-sparse gradient across workers in place, every worker calling it together:
    `gather(t)` returns every worker's t (same shape on each), `reduce(t)` sums t densely. Each
    worker sends its touched rows and their indices, padded to the most any worker touched;
    when the workers touch as many rows as there are, the dense sum is sent instead. The sum
    runs over workers in rank order on every worker, so all hold the same result. Returns the
    numbers this worker sent."""
    rows = touched_rows(g)
    counts = [int(c) for c in gather(g.new_tensor([len(rows)], dtype=torch.int64))]
    if sum(counts) >= len(g):
        reduce(g)
        return g.numel()
    most = max(counts)
    idx = rows.new_zeros(most)
    idx[:len(rows)] = rows
    vals = g.new_zeros((most, g.shape[1]))
    vals[:len(rows)] = g[rows]  # the padding adds zeros to row 0
    g.zero_()
    for i, v in zip(gather(idx), gather(vals)):
        g.index_add_(0, i, v)
    return 1 + most * (1 + g.shape[1])


def train_epoch(model: Student, opt: torch.optim.Optimizer, data: TrainData,
                recipe: Recipe, epoch: int, rank: int = 0, world: int = 1,
                reduce_grads: Callable[[list[torch.Tensor], list[bool]], int | None] =
                lambda grads, row_sparse: None,
                device: str = "cpu", log: Callable[[int, int, float], None] | None = None,
                after_step: Callable[[int, int], None] | None = None,
                slot_weights: np.ndarray | None = None, gather=None) -> dict:
    """One pass over data.batches(...) in global batches of train.batch_size, of which this
    worker trains on its own share (B / world queries). `after_step(step, steps)` runs after
    every optimizer step (mid-epoch validation). slot_weights: batch_loss's.
    `reduce_grads(grads, row_sparse)` sums the gradients across workers (row_sparse marks the
    centroids', see sum_touched_rows) and returns how many numbers it sent. `gather(t)`, every
    worker's tensor t (negatives.Share), splits the pool's re-assignments across the workers.

    Returns the per-query average of the loss and of each term ("loss_pq", "loss_ivf", ...)
    over the epoch, "steps", "queries", "step_losses" (the loss of every step) and "sent" (the
    numbers this worker sent to sum gradients).
    """
    cfg, lcfg, ncfg = recipe.train, recipe.loss, recipe.negatives
    B = cfg.batch_size
    assert B % world == 0, "global batch must split evenly across workers"
    local = B // world
    steps = data.steps(B)
    params = [p for p in model.parameters() if p.requires_grad]
    row_sparse = [p is model.centroids for p in params]
    sent = 0
    recon0 = model.recon_scale
    share = Share(rank, world, gather) if gather is not None else Share()
    sampler = NegativeSampler(data.pool, ncfg, cfg.seed, share)
    sampler.start_epoch(model, device)
    near = ListNegatives(data.pool, ncfg.per_list, cfg.seed, share) if ncfg.per_list and \
        model.spec.ivf and len(data.pool) else None
    if slot_weights is not None:
        slot_weights = torch.as_tensor(slot_weights, dtype=torch.float32, device=device)
        if near is not None:  # a list negative stands for itself
            slot_weights = torch.cat([slot_weights, slot_weights.new_ones(ncfg.per_list)])
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
            pos = torch.cat([pos, near.draw(model, q, pos, lcfg.rank_top or pos.shape[1], epoch,
                                            step)], 1)
        parts = batch_loss(model, q, pos, neg, lcfg, ncfg.in_batch, lab, slot_weights)
        loss = total_loss(parts, lcfg, recon0) / B
        opt.zero_grad(set_to_none=False)
        loss.backward()
        sent += reduce_grads([p.grad for p in params], row_sparse) or 0
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
            "step_losses": step_losses, "sent": sent}


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
    xr = model.rotate(torch.as_tensor(x, dtype=torch.float32, device=model.device))
    c, r_hat, _ = model.quantize(xr)
    return float(((xr - c - r_hat) ** 2).sum(1).mean())
