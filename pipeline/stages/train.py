"""train: Ray Train data-parallel distillation of the IVF centroids, PQ codebooks and rotation.

The per-worker loop is wiring only: it streams the teacher's Parquet parts through Ray Data,
builds the student from the warm start, and calls `pipeline.quant.train.train_epoch` with an
all-reduce passed in. Rank 0 checkpoints every epoch to the run folder; a rerun resumes from
the latest checkpoint.
"""
from __future__ import annotations

import io
import logging
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.index import build
from pipeline.index.knn import block_topk
from pipeline.index.metrics import query_recalls
from pipeline.quant.model import Student
from pipeline.quant.train import TrainData, calibrate, make_optimizer, train_epoch
from pipeline.stages.common import Run
from pipeline.stages.init import load_index
from pipeline.stages.teacher import load_parts, table_arrays

log = logging.getLogger("pipeline.stages.train")


class StreamData:
    """The teacher's training parts streamed through Ray Data, in the interface of
    pipeline.quant.train.TrainData. Every worker iterates the same stream in the same seeded
    order (a local shuffle buffer, no global gather) and trains on its slice of each global
    batch, so W workers take exactly the steps one worker would."""

    def __init__(self, it, pool: np.ndarray, rows: int, shuffle_rows: int):
        self.it, self.pool, self.rows, self.shuffle_rows = it, pool, rows, shuffle_rows

    def steps(self, batch_size: int) -> int:
        return self.rows // batch_size

    def batches(self, batch_size: int, seed: int, epoch: int):
        shuffle = {"local_shuffle_buffer_size": self.shuffle_rows,
                   "local_shuffle_seed": seed * 1_000_003 + epoch} if self.shuffle_rows else {}
        for t in self.it.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                      drop_last=True, **shuffle):
            a = table_arrays(t, ("xq", "V"))  # V's width gives k: S need not be read
            yield a["xq"], a["V"], None


def build_student(params: dict, pcfg: PipelineConfig) -> Student:
    t = pcfg.train
    return Student(params, pcfg.index.metric, t.learn_ivf, t.learn_pq, t.learn_rotation,
                        t.soft_temperature)


def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class IndexValidator:
    """Validation as the product is used: the exported faiss index over the sample pool,
    searched by held-out queries at nprobe = nlist / 8, against the exact top-k in the pool.
    Returns each query's recall, so that two students can be compared query by query."""

    def __init__(self, val: TrainData, metric: str, k: int = 10):
        self.xq, self.pool, self.metric, self.k = val.xq, val.pool, metric, k
        self.gt = block_topk(val.xq, val.pool, np.arange(len(val.pool)), k, metric)[1]

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


def fit_local(params: dict, data: TrainData, val: TrainData, pcfg: PipelineConfig,
              rank: int = 0, world: int = 1, reduce_grads=lambda g: None, state: dict | None = None,
              on_epoch=None, device: str = "cpu") -> dict:
    """The training loop of one worker (or of a single process): epochs, validation
    (train.val_checks times an epoch), keeping the best student and never one worse than the
    warm start. A validation below the best restores the best and backs the learning rates
    off. Every worker validates the same student identically, so all take the same branch.
    Returns the final state."""
    cfg = pcfg.train
    model = build_student(params, pcfg).to(device)
    calibrate(model, data.pool[:4096])
    opt = make_optimizer(model, cfg)
    validate = IndexValidator(val, pcfg.index.metric)
    if state is None:
        warm_q = validate(model)
        warm = _mean(warm_q)
        state = {"epoch": 0, "best_val": warm, "warm_val": warm, "best": model.export(),
                 "best_model": _clone_state(model), "best_q": warm_q, "backoffs": 0,
                 "history": []}
        log.info("train: warm start validation recall %.4f; learning rates %s", warm,
                 ", ".join(f"{g['lr']:.3g}" for g in opt.param_groups))
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        state.setdefault("backoffs", 0)  # a checkpoint from before lr backoff
        state.setdefault("best_model", _clone_state(model))
        if "best_q" not in state:  # a checkpoint from before per-query validation
            model.load_state_dict(state["best_model"])
            state["best_q"] = validate(model)
            model.load_state_dict(state["model"])

    def check() -> float:
        v_q = validate(model)
        v = _mean(v_q)
        if v > state["best_val"]:
            state.update(best_val=v, best=model.export(), best_model=_clone_state(model),
                         best_q=v_q)
        elif cfg.lr_backoff < 1 and significant_fall(state["best_q"], v_q, cfg.backoff_z):
            model.load_state_dict(state["best_model"])
            opt.state.clear()  # fresh moments for the smaller steps
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_backoff
            state["backoffs"] += 1
            if rank == 0:
                log.info("train: validation recall %.4f < best %.4f: back to the best, "
                         "learning rates x%g", v, state["best_val"], cfg.lr_backoff)
        return v

    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.time()

        def progress(step, steps, loss, _t0=t0, _epoch=epoch):
            if rank == 0 and (step % 50 == 0 or step == steps):
                eta = (time.time() - _t0) / step * (steps - step)
                log.info("train: epoch %d step %d/%d loss %.4f ETA %.0fs", _epoch + 1, step,
                         steps, loss, eta)

        def mid_epoch(step, steps):  # the epoch's last validation comes after it
            every = max(1, steps // cfg.val_checks)
            if step % every == 0 and step + every <= steps:
                check()

        m = train_epoch(model, opt, data, cfg, epoch, rank, world, reduce_grads, device,
                        progress, mid_epoch)
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


def _worker_loop(config: dict) -> None:
    import torch.distributed as dist

    from pipeline.stages.common import pin_threads

    pin_threads()
    run: Run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if run.cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    teacher = run.stage_info("teacher")
    pool = storage.load_npz(run.stage_path("ingest", "sample.npz"))["x"]
    data = StreamData(ray.train.get_dataset_shard("teacher"), pool, teacher["rows"]["train"],
                      run.cfg.train.shuffle_buffer)
    held = load_parts(teacher["val"], run.cfg.train.max_val_queries)
    val = TrainData(held["xq"], held["V"], pool)
    params = build.extract_params(load_index(run.stage_path("init", "baseline.index")))
    ckpt_uri = run.stage_path("train", "checkpoint.pt")
    state = None
    if storage.exists(ckpt_uri):
        state = torch.load(io.BytesIO(storage.read_bytes(ckpt_uri)), map_location="cpu",
                           weights_only=False)
        if rank == 0:
            log.info("train: resuming from %s after epoch %d", ckpt_uri, state["epoch"])

    def reduce_grads(grads):
        if world > 1:
            for g in grads:
                dist.all_reduce(g)  # SUM: losses are already divided by the global batch

    def on_epoch(st, metrics):
        checkpoint = None
        if rank == 0:
            blob = _state_bytes(st)
            storage.write_bytes(ckpt_uri, blob)
            tmp = tempfile.mkdtemp()
            with open(os.path.join(tmp, "state.pt"), "wb") as f:
                f.write(blob)
            checkpoint = Checkpoint.from_directory(tmp)
        # Scalars only: the per-step curve stays in the checkpoint's history.
        ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, list)},
                         checkpoint=checkpoint)

    fit_local(params, data, val, run.cfg, rank, world, reduce_grads, state, on_epoch, device)


def run(run: Run) -> dict:
    cfg = run.cfg.train
    t0 = time.time()
    fs, path = storage.pyarrow_fs(run.stage_path("train", "ray"))
    # The training parts stream from object storage; every worker reads the whole stream in
    # the same order (not split) and takes its slice of each global batch.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    parts = run.stage_info("teacher")["train"]
    pfs, _ = storage.pyarrow_fs(parts[0])
    ds = ray.data.read_parquet([storage.pyarrow_fs(u)[1] for u in parts], filesystem=pfs,
                               columns=["xq", "V"])
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"run": run},
        datasets={"teacher": ds},
        dataset_config=DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="distill", storage_path=path, storage_filesystem=fs),
    )
    trainer.fit()
    ckpt_uri = run.stage_path("train", "checkpoint.pt")
    if not storage.exists(ckpt_uri):
        raise RuntimeError("training finished without writing a checkpoint (0 epochs?)")
    state = torch.load(io.BytesIO(storage.read_bytes(ckpt_uri)), map_location="cpu",
                           weights_only=False)
    storage.save_npz(run.stage_path("train", "params.npz"), **state["best"])
    secs = time.time() - t0
    improved = state["best_val"] > state["warm_val"]
    log.info("train: %d epochs in %.1fs; validation recall %.4f -> %.4f%s", state["epoch"], secs,
             state["warm_val"], state["best_val"],
             "" if improved else " (no gain: exporting the warm start)")
    return {"history": state["history"], "warm_val": state["warm_val"],
            "best_val": state["best_val"], "seconds": secs}
