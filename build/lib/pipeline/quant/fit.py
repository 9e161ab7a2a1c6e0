"""The training loop around the pure epoch kernel: validation as the product is used, the
best student kept, and learning-rate backoff on a significant fall. No Ray here: the
pipeline's train stage runs `fit` in each Ray Train worker with an all-reduce passed in, and
bench/quality.py runs it in one process.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from pipeline.index import build
from pipeline.index.knn import Band, block_topk
from pipeline.index.metrics import query_recalls
from pipeline.index.params import Params
from pipeline.quant.loop import (
    Recipe,
    TrainData,
    calibrate,
    make_optimizer,
    schedule,
    train_epoch,
)
from pipeline.quant.model import Student

log = logging.getLogger("ivf_distill.quant.fit")


def build_student(params: Params, cfg) -> Student:
    """The student of `params`, as `cfg` (the config, or the train stage's view of it) sets it
    up: data.metric, what train.learn_* learns, loss.soft_temperature."""
    t = cfg.train
    return Student(params, cfg.data.metric, t.learn_ivf, t.learn_pq, t.learn_rotation,
                   cfg.loss.soft_temperature)


class IndexValidator:
    """Validation as the product is used: the exported faiss index over the sample pool (its
    first `pool_size` vectors, a random subset that bounds each validation's cost however large
    the sample), searched by held-out queries at nprobe = nlist / 8, against the exact top-k
    in that pool. Returns each query's recall, so that two students can be compared query by
    query."""

    def __init__(self, val: TrainData, metric: str, k: int = 10, pool_size: int | None = None):
        self.xq, self.metric, self.k = val.xq, metric, k
        self.pool = val.pool[:pool_size]
        self.gt = block_topk(val.xq, self.pool, np.arange(len(self.pool)), k, metric)[1]

    def __call__(self, model: Student) -> np.ndarray:
        if not len(self.xq):
            return np.zeros(0)
        index = build.index_from_params(model.export(), self.metric)
        index.add(self.pool)
        build.set_nprobe(index, max(1, model.centroids.shape[0] // 8))
        return query_recalls(index.search(self.xq, self.k)[1], self.gt, self.k)


def _mean(recalls: np.ndarray) -> float:
    return float(recalls.mean()) if len(recalls) else 0.0


def significant_fall(best: np.ndarray, now: np.ndarray, z: float) -> bool:
    """Whether validation recall fell below the best by more than z standard errors of the
    per-query difference (a paired comparison on the same queries): a fall that noise
    explains does not count."""
    diff = best - now
    if not len(diff) or diff.mean() <= 0:
        return False
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return bool(diff.mean() > z * se)


def _clone_state(model: Student) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _start(model: Student, opt, validate, state: dict | None) -> dict:
    """The training state: a checkpoint's (`state`), loaded into model and optimizer, or a
    fresh one whose best and warm start are the model as it is."""
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return state
    warm_q = validate(model)
    warm = _mean(warm_q)
    log.info("train: warm start validation recall %.4f; learning rates %s", warm,
             ", ".join(f"{g['lr']:.3g}" for g in opt.param_groups))
    return {"epoch": 0, "best_val": warm, "warm_val": warm, "best": model.export(),
            "best_model": _clone_state(model), "best_q": warm_q, "backoffs": 0, "history": []}


def _check(model: Student, opt, validate, state: dict, cfg, rank: int) -> float:
    """Validates the model: a new best is kept; a significant fall below the best restores
    the best and backs the learning rates off (train.lr_backoff). Returns the recall."""
    v_q = validate(model)
    v = _mean(v_q)
    if v > state["best_val"]:
        state.update(best_val=v, best=model.export(), best_model=_clone_state(model),
                     best_q=v_q)
    elif cfg.lr_backoff < 1 and significant_fall(state["best_q"], v_q, cfg.backoff_z):
        model.load_state_dict(state["best_model"])
        opt.state.clear()  # fresh moments for the smaller steps
        for group in opt.param_groups:
            group["base_lr"] *= cfg.lr_backoff
        state["backoffs"] += 1
        if rank == 0:
            log.info("train: validation recall %.4f < best %.4f: back to the best, "
                     "learning rates x%g", v, state["best_val"], cfg.lr_backoff)
    return v


def fit(params: Params, data: TrainData, val: TrainData, pcfg,
        rank: int = 0, world: int = 1, reduce_grads=lambda grads, row_sparse: None,
        state: dict | None = None, on_epoch=None, device: str = "cpu", gather=None) -> dict:
    """The training loop of one worker (or of a single process): `pcfg` is the config (or the
    train stage's view of it), of which it reads data, teacher, loss, negatives and train.
    Epochs, validation (train.val_checks times an epoch), keeping the best student and never
    one worse than the warm start. A validation below the best restores the best and backs
    the learning rates off. Every worker validates the same student identically, so all take
    the same branch. `reduce_grads` and `gather` combine the workers (loop.train_epoch).
    Returns the final state."""
    # rank_top 0 means the teacher's contiguous top k, not its whole list: a band of deeper
    # neighbours (teacher.band_*) follows the top k in each list.
    cfg = pcfg.train
    recipe = Recipe(cfg, dataclasses.replace(pcfg.loss, rank_top=pcfg.loss.rank_top or
                                             pcfg.teacher.k), pcfg.negatives)
    band = Band.of(pcfg.teacher)
    slot_weights = band.slot_weights() if band is not None and pcfg.loss.band_weighting else None
    model = build_student(params, pcfg).to(device)
    calibrate(model, data.pool[:4096])
    opt = make_optimizer(model, cfg)
    validate = IndexValidator(val, pcfg.data.metric, pool_size=cfg.val_pool)
    state = _start(model, opt, validate, state)

    def check() -> float:
        return _check(model, opt, validate, state, cfg, rank)

    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.time()
        schedule(opt, cfg.lr_schedule, epoch / cfg.epochs)

        def progress(step, steps, loss, _t0=t0, _epoch=epoch):
            if rank == 0 and (step % 50 == 0 or step == steps):
                eta = (time.time() - _t0) / step * (steps - step)
                log.info("train: epoch %d step %d/%d loss %.4f ETA %.0fs", _epoch + 1, step,
                         steps, loss, eta)

        def after_step(step, steps, _epoch=epoch):  # the epoch's last validation follows it
            every = max(1, steps // cfg.val_checks)
            if step % every == 0 and step + every <= steps:
                check()
            schedule(opt, cfg.lr_schedule, (_epoch * steps + step) / (cfg.epochs * steps))

        m = train_epoch(model, opt, data, recipe, epoch, rank, world, reduce_grads, device,
                        progress, after_step, slot_weights, gather)
        m["val_recall"] = check()
        m["seconds"] = time.time() - t0
        m["queries_per_s_per_worker"] = m["queries"] / world / max(m["seconds"], 1e-9)
        m["epoch"] = epoch + 1
        m["lr"] = opt.param_groups[0]["lr"]
        state["history"].append(m)
        state.update(epoch=epoch + 1, model=model.state_dict(), optimizer=opt.state_dict())
        if rank == 0:
            log.info("train: epoch %d/%d loss %.4f val recall %.4f (best %.4f, warm %.4f) "
                     "%.1fs", epoch + 1, cfg.epochs, m["loss"], m["val_recall"],
                     state["best_val"], state["warm_val"], m["seconds"])
        if on_epoch is not None:
            on_epoch(state, m)
    return state
