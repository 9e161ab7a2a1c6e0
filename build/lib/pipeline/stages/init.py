"""init: faiss k-means IVF + PQ/OPQ on the sample: the baseline, and the student's warm start."""
from __future__ import annotations

import logging
import os
import time

import faiss
import ray

from pipeline import storage
from pipeline.distributed.placement import (
    Group,
    largest_node_cpus,
    largest_node_gpus,
    memory,
    placement,
)
from pipeline.distributed.tasks import pin_threads
from pipeline.index import build, gpu
from pipeline.workflow.results import Initialized
from pipeline.workflow.stage import Context, Stage

log = logging.getLogger("ivf_distill.stages.init")


@ray.remote
def _train_baseline(sample_uri: str, out_uri: str, index_cfg, init_cfg, use_gpu: bool,
                    metric) -> dict:
    pin_threads()
    xt = storage.load_npz(sample_uri)["x"]
    t0 = time.time()
    index = build.train_baseline(xt, index_cfg, niter=init_cfg.niter, seed=init_cfg.seed,
                                 use_gpu=use_gpu, opq_niter=init_cfg.opq_niter, metric=metric,
                                 kmeans=init_cfg.kmeans, opq_points=init_cfg.opq_train_points)
    with storage.scratch("init") as scratch:
        local = os.path.join(scratch, "baseline.index")
        faiss.write_index(index, local)
        storage.upload_file(local, out_uri)
    # The node's faiss decides, not the driver's: the head may have no GPU.
    where = f"cuda ({gpu.gpu_count()} GPUs)" if use_gpu and gpu.gpu_count() else "cpu"
    if use_gpu and where == "cpu":
        log.warning("init: GPUs were asked for (ray.gpus_per_task > 0), but this node's faiss "
                    "sees none (%s): k-means runs on the CPU", gpu.library())
    return {"train_seconds": time.time() - t0, "n_train": len(xt),
            "device": f"{where}; {gpu.library()}"}


def run(ctx: Context) -> Initialized:
    cfg, ingested = ctx.cfg, ctx.inputs["ingest"]
    # The sample is a Bernoulli draw: it can fall short of what preflight expected.
    build.check_shape(cfg.index, ingested.d, ingested.sample)
    if ingested.sample < 39 * cfg.index.nlist:
        log.warning("init: %d training vectors for index.nlist=%d, fewer than the 39 per list "
                    "faiss's k-means wants (%d); raise data.train_sample", ingested.sample,
                    cfg.index.nlist, 39 * cfg.index.nlist)
    # With GPUs configured (ray.gpus_per_task > 0), k-means runs in the GPU group on every GPU
    # of its largest node (faiss-gpu shards the centroids over them); otherwise on every core
    # of the largest node of the CPU group.
    gpus = cfg.ray.gpus_per_task
    group = Group.GPU if gpus else Group.CPU
    most = largest_node_gpus(cfg.ray, group) if gpus else 0
    if gpus and not most:
        log.warning("init: ray.gpus_per_task=%s, but no node of the GPU group offers GPUs: "
                    "k-means runs on the CPU", gpus)
    # The sample as loaded and as trained on (OPQ rotates a copy), and k-means's assignments.
    need = 3 * 4 * ingested.d * ingested.sample
    task = _train_baseline.options(num_cpus=largest_node_cpus(cfg.ray, group),
                                   num_gpus=most,
                                   resources=placement(cfg.ray, group),
                                   memory=memory(cfg.ray, group, need))
    info = ray.get(task.remote(ctx.upstream("ingest", "sample.npz"), ctx.path("baseline.index"),
                               cfg.index, cfg.init, bool(gpus), cfg.data.metric))
    log.info("init: faiss baseline trained on %d vectors in %.1fs (%s)", info["n_train"],
             info["train_seconds"], info["device"])
    return Initialized(**info)


STAGE = Stage("init", sections=("index", "init", "data"), needs=("ingest",), result=Initialized,
              run=run)
