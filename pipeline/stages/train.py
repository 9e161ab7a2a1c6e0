"""train: Ray Train data-parallel distillation of the IVF centroids, PQ codebooks and rotation.

The per-worker loop is wiring only: it streams the teacher's Parquet parts through Ray Data
and runs `pipeline.quant.fit.fit` with an all-reduce passed in. Rank 0 checkpoints every epoch
to the run folder, tagged with the stage key; a rerun with the same key resumes from it, and a
checkpoint of another key (or any, when --from-stage forces training) is set aside unread.
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
from pipeline.data.teacher_parts import load_parts, table_arrays
from pipeline.index import build
from pipeline.quant.fit import fit
from pipeline.quant.train import TrainData
from pipeline.stages.common import Run, pin_threads

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


def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_state(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                      weights_only=False)


def _worker_loop(config: dict) -> None:
    import torch.distributed as dist

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
    params = build.extract_params(storage.read_index(run.stage_path("init", "baseline.index")))
    ckpt_uri = run.stage_path("train", "checkpoint.pt")
    state = _load_state(ckpt_uri) if config["resume"] else None

    def reduce_grads(grads):
        if world > 1:
            for g in grads:
                dist.all_reduce(g)  # SUM: losses are already divided by the global batch

    def on_epoch(st, metrics):
        checkpoint = None
        if rank == 0:
            blob = _state_bytes({**st, "stage_key": config["key"]})
            storage.write_bytes(ckpt_uri, blob)
            tmp = tempfile.mkdtemp()
            with open(os.path.join(tmp, "state.pt"), "wb") as f:
                f.write(blob)
            checkpoint = Checkpoint.from_directory(tmp)
        # Scalars only: the per-step curve stays in the checkpoint's history.
        ray.train.report({k: v for k, v in metrics.items() if not isinstance(v, list)},
                         checkpoint=checkpoint)

    fit(params, data, val, run.cfg, rank, world, reduce_grads, state, on_epoch, device)


def _resumable(run: Run, ckpt_uri: str) -> bool:
    """Whether the checkpoint left in the run folder continues this very training: written
    under this stage key, and training not forced. Any other is moved aside, never resumed."""
    if not storage.exists(ckpt_uri):
        return False
    state = _load_state(ckpt_uri)
    key = state.get("stage_key")
    if key == run.keys.get("train", "") and "train" not in run.forced:
        log.info("train: resuming from %s after epoch %d", ckpt_uri, state["epoch"])
        return True
    aside = run.stage_path("train", "set-aside", f"checkpoint-{key}-{int(time.time())}.pt")
    storage.copy(ckpt_uri, aside)
    storage.delete(ckpt_uri)
    log.info("train: %s set aside (%s); training starts from the warm start", ckpt_uri,
             "--from-stage" if "train" in run.forced else "written under other settings")
    return False


def run(run: Run) -> dict:
    cfg = run.cfg.train
    t0 = time.time()
    ckpt_uri = run.stage_path("train", "checkpoint.pt")
    resume = _resumable(run, ckpt_uri)
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
        train_loop_config={"run": run, "key": run.keys.get("train", ""), "resume": resume},
        datasets={"teacher": ds},
        dataset_config=DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="distill", storage_path=path, storage_filesystem=fs),
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
    return {"history": state["history"], "warm_val": state["warm_val"],
            "best_val": state["best_val"], "seconds": secs}
