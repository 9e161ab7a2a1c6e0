"""train: Ray Train data-parallel distillation of the IVF centroids, PQ codebooks and rotation.

The per-worker loop is wiring only: it streams its own share of the teacher's Parquet parts
(pipeline.data.teacher_stream) and runs `pipeline.quant.fit.fit` with an all-reduce passed in.
Rank 0 checkpoints every epoch to the run folder, tagged with the stage key, as arrays and
JSON (pipeline.checkpoint: nothing read back is unpickled), and at the end writes the best
student (params.npz) and the training's record (summary.json): the driver reads that record
and the checkpoint's structure, never the model, so it holds nothing that grows with nlist.
A worker that starts finds the checkpoint of its own key and resumes from it: after a rerun,
or after Ray Train restarted the workers because one (or its node) was lost. One worker
(ray.train_workers=1) has nothing to all-reduce: it runs as a plain Ray task, which Ray
retries on another node as Ray Train would restart it, without Ray Train's start-up (a
controller, a worker group, a process group: about ten seconds). A checkpoint of
another key, one that does not read as a checkpoint, or any when --from-stage forces
training, is set aside before training starts.
"""
from __future__ import annotations

import logging
import time

import ray
import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import checkpoint, events, storage
from pipeline.data.teacher_parts import load_parts
from pipeline.data.teacher_stream import TeacherStream
from pipeline.distributed.placement import Group, largest_node_cpus, placement
from pipeline.distributed.tasks import keep_freed_memory, pin_threads
from pipeline.errors import InputError
from pipeline.index import build
from pipeline.quant.fit import fit
from pipeline.quant.loop import TrainData, sum_touched_rows
from pipeline.workflow.results import Taught, Trained
from pipeline.workflow.stage import Context, Stage

log = logging.getLogger("ivf_distill.stages.train")


CHECKPOINT = "checkpoint.npz"
PARAMS = "params.npz"
SUMMARY = "summary.json"  # history, warm_val, best_val, epoch: the Trained result's inputs


def _load_state(uri: str) -> dict:
    return checkpoint.loads(storage.read_bytes(uri))


def _load_meta(uri: str) -> dict:
    """The checkpoint's structure (stage key, epoch, history) without its arrays."""
    with storage.open_ranged(uri) as f:
        return checkpoint.load_meta(f)


def _worker_loop(config: dict) -> None:
    import torch.distributed as dist

    pin_threads()
    ctx: Context = config["ctx"]
    alone = config.get("alone", False)  # a plain Ray task: one worker, no Ray Train
    if alone:
        rank, world = 0, 1
    else:
        train_ctx = ray.train.get_context()
        rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    cfg = ctx.cfg.train
    device = "cuda" if ctx.cfg.ray.train_gpu and torch.cuda.is_available() else "cpu"
    if ctx.cfg.ray.train_gpu and device == "cpu" and rank == 0:
        log.warning("train: ray.train_gpu=true, but torch in the training workers sees no "
                    "CUDA device (a CPU build of torch, or no GPU given): training on the CPU")
    teacher: Taught = ctx.inputs["teacher"]
    pool = storage.load_npz(ctx.upstream("ingest", "sample.npz"))["x"]

    def gather(xq):
        out = [None] * world
        dist.all_gather_object(out, xq)
        return out

    data = TeacherStream(teacher.train, pool, cfg.streams, rank, world, cfg.shuffle_buffer,
                         gather)
    held = load_parts(teacher.val, cfg.max_val_queries)
    val = TrainData(held["xq"], held["V"], pool)
    params = build.extract_params(storage.read_index(ctx.upstream("init", "baseline.index")))
    ckpt_uri = ctx.path(CHECKPOINT)
    # Any checkpoint of this key continues this training: the driver set other ones aside.
    state = _load_state(ckpt_uri) if storage.exists(ckpt_uri) else None
    if state is not None and state.get("stage_key") != ctx.key:
        state = None
    if state is not None and rank == 0:
        log.info("train: worker starts from the checkpoint after epoch %d", state["epoch"])

    def gather_tensors(t):
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t)
        return out

    def reduce_grads(grads, row_sparse):
        """SUM (losses are already divided by the global batch); returns the numbers sent."""
        if world == 1:
            return 0
        sent = 0
        for g, sparse in zip(grads, row_sparse):
            if sparse:
                sent += sum_touched_rows(g, gather_tensors, dist.all_reduce)
            else:
                dist.all_reduce(g)
                sent += g.numel()
        return sent

    epochs_here = []  # epochs this process trained (a restarted worker trains the rest)

    def on_epoch(st, metrics):
        epochs_here.append(st["epoch"])
        if rank == 0:
            # The one checkpoint: a restarted worker resumes from it, not from Ray Train's
            # own checkpoints, which would be a second copy of every epoch.
            storage.write_bytes(ckpt_uri, checkpoint.dumps({**st, "stage_key": ctx.key}))
            events.emit("train-epoch")  # a checkpoint written
        if not alone:  # scalars only: the per-step curve stays in the checkpoint's history
            ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, list)})

    keep_freed_memory()  # this training process keeps its peak anyway: no re-faulting
    state = fit(params, data, val, ctx.cfg, rank, world, reduce_grads, state, on_epoch, device,
                gather_tensors if world > 1 else None)
    if rank == 0:
        storage.save_npz(ctx.path(PARAMS), **state["best"].arrays())
        storage.write_json(ctx.path(SUMMARY), {k: state[k] for k in
                                               ("epoch", "warm_val", "best_val", "history")})
    storage.write_json(ctx.path("reads", f"rank-{rank}.json"),
                       {"bytes": data.bytes_read, "rows": data.rows_read,
                        "total_rows": data.parts.rows, "epochs": len(epochs_here),
                        "device": f"{device}; torch {torch.__version__}"})


def _resumable(ctx: Context, ckpt_uri: str) -> bool:
    """Whether the checkpoint left in the run folder continues this very training: written
    under this stage key, and training not forced (ctx.resume_key is then ""). Any other is
    moved aside, never resumed."""
    if not storage.exists(ckpt_uri):
        return False
    try:
        state, why = _load_meta(ckpt_uri), "written under other settings"
        if not isinstance(state, dict):
            raise InputError("not a training state")
    except ValueError as e:
        state, why = {}, f"unreadable: {e}"
    key = state.get("stage_key")
    if key is not None and key == ctx.resume_key:
        log.info("train: resuming from %s after epoch %d", ckpt_uri, state["epoch"])
        return True
    aside = ctx.path("set-aside", f"checkpoint-{key}-{time.time_ns()}.npz")
    storage.copy(ckpt_uri, aside)
    storage.delete(ckpt_uri)
    log.info("train: %s set aside (%s); training starts from the warm start", ckpt_uri,
             why if ctx.resume_key else "--from-stage")
    return False


def run(ctx: Context) -> Trained:
    ray_cfg = ctx.cfg.ray
    most = largest_node_cpus(ray_cfg, Group.GPU)
    if ray_cfg.train_cpus > most:  # such a worker could never be placed
        raise InputError(f"ray.train_cpus={ray_cfg.train_cpus}: no node of the training group "
                         f"offers more than {most} CPUs; lower it")
    t0 = time.time()
    ckpt_uri = ctx.path(CHECKPOINT)
    _resumable(ctx, ckpt_uri)  # sets a checkpoint of other settings aside
    for stale in ("reads", PARAMS, SUMMARY):  # this training writes them anew
        storage.delete(ctx.path(stale))
    if ray_cfg.train_workers == 1:
        _train_alone(ctx)
    else:
        _train_together(ctx)
    assert storage.exists(ctx.path(SUMMARY)), "rank 0 writes it when training ends"
    state = storage.read_json(ctx.path(SUMMARY))
    secs = time.time() - t0
    improved = state["best_val"] > state["warm_val"]
    log.info("train: %d epochs in %.1fs; validation recall %.4f -> %.4f%s", state["epoch"], secs,
             state["warm_val"], state["best_val"],
             "" if improved else " (no gain: exporting the warm start)")
    reads = [storage.read_json(ctx.path("reads", f"rank-{r}.json"))
             for r in range(ray_cfg.train_workers)]
    shares = [r["rows"] / max(r["total_rows"] * r["epochs"], 1) for r in reads]
    log.info("train: each worker read %s of the training rows per epoch",
             ", ".join(f"{x:.0%}" for x in shares))
    device = ", ".join(sorted({r.get("device", "") for r in reads}))
    log.info("train: %d workers on %s", ray_cfg.train_workers, device)
    return Trained(history=state["history"], warm_val=state["warm_val"],
                   best_val=state["best_val"], seconds=secs, worker_read_shares=shares,
                   worker_read_bytes=[r["bytes"] for r in reads], device=device)


# The training loop allocates where keep_freed_memory applies only with one malloc arena (Ray
# Train runs the loop in a thread of its own).
_WORKER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "1"}}


def _train_alone(ctx: Context) -> None:
    """One worker, as a Ray task in the GPU group; Ray runs it again after a lost worker or
    node (ray.max_failures times), and it resumes from the checkpoint."""
    ray_cfg = ctx.cfg.ray
    task = ray.remote(_worker_loop).options(
        num_cpus=ray_cfg.train_cpus, num_gpus=1 if ray_cfg.train_gpu else 0,
        resources=placement(ray_cfg, Group.GPU), max_retries=ray_cfg.max_failures,
        runtime_env=_WORKER_ENV, name="train")
    ray.get(task.remote({"ctx": ctx, "alone": True}))


def _train_together(ctx: Context) -> None:
    """ray.train_workers data-parallel Ray Train workers, restarted (ray.max_failures times)
    after a lost worker or node."""
    ray_cfg = ctx.cfg.ray
    fs, path = storage.pyarrow_fs(ctx.path("ray"))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"ctx": ctx},
        scaling_config=ScalingConfig(num_workers=ray_cfg.train_workers,
                                     use_gpu=ray_cfg.train_gpu,
                                     resources_per_worker={
                                         "CPU": ray_cfg.train_cpus,
                                         **placement(ray_cfg, Group.GPU)}),
        run_config=RunConfig(name="distill", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             worker_runtime_env=_WORKER_ENV),
    )
    trainer.fit()


# The loss, negatives and optimisation it distils with, the teacher it learns from, the index
# structure and metric its student has. Its workers (ray.train_workers) are in no key: W
# workers take exactly the steps one takes (tests/test_stages.py checks it).
STAGE = Stage("train", sections=("loss", "negatives", "train", "teacher", "index", "data"),
              needs=("ingest", "init", "teacher"), result=Trained, run=run)
