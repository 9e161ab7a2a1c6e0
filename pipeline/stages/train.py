"""train: Ray Train data-parallel distillation of the IVF centroids, PQ codebooks and rotation.

The per-worker loop is wiring only: it streams its own share of the teacher's Parquet parts
(pipeline.data.teacher_stream) and runs `pipeline.quant.fit.fit` with an all-reduce passed in.
Rank 0 checkpoints every epoch to the run folder, tagged with the stage key, as arrays and
JSON (pipeline.checkpoint: nothing read back is unpickled). A worker that starts finds the
checkpoint of its own key and resumes from it: after a rerun, or after Ray Train restarted the
workers because one (or its node) was lost. A checkpoint of another key, one that does not
read as a checkpoint, or any when --from-stage forces training, is set aside before training
starts.
"""
from __future__ import annotations

import logging
import time

import ray
import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import checkpoint, storage
from pipeline.data.teacher_parts import load_parts
from pipeline.data.teacher_stream import TeacherStream
from pipeline.distributed.placement import Group, placement
from pipeline.distributed.tasks import fault_point, pin_threads
from pipeline.index import build
from pipeline.quant.fit import fit, keep_freed_memory
from pipeline.quant.loop import TrainData
from pipeline.stages.common import Run

log = logging.getLogger("pipeline.stages.train")


CHECKPOINT = "checkpoint.npz"


def _load_state(uri: str) -> dict:
    return checkpoint.loads(storage.read_bytes(uri))


def _worker_loop(config: dict) -> None:
    import torch.distributed as dist

    pin_threads()
    run: Run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = run.cfg.train
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    teacher = run.stage_info("teacher")
    pool = storage.load_npz(run.stage_path("ingest", "sample.npz"))["x"]

    def gather(xq):
        out = [None] * world
        dist.all_gather_object(out, xq)
        return out

    data = TeacherStream(teacher["train"], pool, cfg.streams, rank, world, cfg.shuffle_buffer,
                         gather)
    held = load_parts(teacher["val"], cfg.max_val_queries)
    val = TrainData(held["xq"], held["V"], pool)
    params = build.extract_params(storage.read_index(run.stage_path("init", "baseline.index")))
    ckpt_uri = run.stage_path("train", CHECKPOINT)
    # Any checkpoint of this key continues this training: the driver set other ones aside.
    state = _load_state(ckpt_uri) if storage.exists(ckpt_uri) else None
    if state is not None and state.get("stage_key") != config["key"]:
        state = None
    if state is not None and rank == 0:
        log.info("train: worker starts from the checkpoint after epoch %d", state["epoch"])

    def reduce_grads(grads):
        if world > 1:
            for g in grads:
                dist.all_reduce(g)  # SUM: losses are already divided by the global batch

    epochs_here = []  # epochs this process trained (a restarted worker trains the rest)

    def on_epoch(st, metrics):
        epochs_here.append(st["epoch"])
        if rank == 0:
            # The one checkpoint: a restarted worker resumes from it, not from Ray Train's
            # own checkpoints, which would be a second copy of every epoch.
            storage.write_bytes(ckpt_uri, checkpoint.dumps({**st, "stage_key": config["key"]}))
            fault_point("train-epoch")
        # Scalars only: the per-step curve stays in the checkpoint's history.
        ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, list)})

    keep_freed_memory()  # this training process keeps its peak anyway: no re-faulting
    fit(params, data, val, run.cfg, rank, world, reduce_grads, state, on_epoch, device)
    storage.write_json(run.stage_path("train", "reads", f"rank-{rank}.json"),
                       {"bytes": data.bytes_read, "rows": data.rows_read,
                        "total_rows": data.parts.rows, "epochs": len(epochs_here)})


def _resumable(run: Run, ckpt_uri: str) -> bool:
    """Whether the checkpoint left in the run folder continues this very training: written
    under this stage key, and training not forced. Any other is moved aside, never resumed."""
    if not storage.exists(ckpt_uri):
        return False
    try:
        state, why = _load_state(ckpt_uri), "written under other settings"
    except ValueError as e:
        state, why = {}, f"unreadable: {e}"
    key = state.get("stage_key")
    if key is not None and key == run.keys.get("train", "") and "train" not in run.forced:
        log.info("train: resuming from %s after epoch %d", ckpt_uri, state["epoch"])
        return True
    aside = run.stage_path("train", "set-aside", f"checkpoint-{key}-{time.time_ns()}.npz")
    storage.copy(ckpt_uri, aside)
    storage.delete(ckpt_uri)
    log.info("train: %s set aside (%s); training starts from the warm start", ckpt_uri,
             "--from-stage" if "train" in run.forced else why)
    return False


def run(run: Run) -> dict:
    cfg = run.cfg.train
    t0 = time.time()
    ckpt_uri = run.stage_path("train", CHECKPOINT)
    _resumable(run, ckpt_uri)  # sets a checkpoint of other settings aside
    storage.delete(run.stage_path("train", "reads"))
    fs, path = storage.pyarrow_fs(run.stage_path("train", "ray"))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"run": run, "key": run.keys.get("train", "")},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={
                                         "CPU": 1, **placement(run.cfg, Group.GPU)}),
        run_config=RunConfig(name="distill", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             # Ray Train runs the loop in a thread of its own: with one
                             # arena it allocates where keep_freed_memory applies
                             worker_runtime_env={"env_vars": {"MALLOC_ARENA_MAX": "1"}}),
    )
    trainer.fit()
    assert storage.exists(ckpt_uri), "every epoch writes a checkpoint, and epochs >= 1"
    state = _load_state(ckpt_uri)
    storage.save_npz(run.stage_path("train", "params.npz"), **state["best"].arrays())
    secs = time.time() - t0
    improved = state["best_val"] > state["warm_val"]
    log.info("train: %d epochs in %.1fs; validation recall %.4f -> %.4f%s", state["epoch"], secs,
             state["warm_val"], state["best_val"],
             "" if improved else " (no gain: exporting the warm start)")
    reads = [storage.read_json(run.stage_path("train", "reads", f"rank-{r}.json"))
             for r in range(cfg.num_workers)]
    shares = [r["rows"] / max(r["total_rows"] * r["epochs"], 1) for r in reads]
    log.info("train: each worker read %s of the training rows per epoch",
             ", ".join(f"{x:.0%}" for x in shares))
    return {"history": state["history"], "warm_val": state["warm_val"],
            "best_val": state["best_val"], "seconds": secs, "worker_read_shares": shares,
            "worker_read_bytes": [r["bytes"] for r in reads]}
