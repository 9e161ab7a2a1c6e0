"""init: faiss k-means IVF + PQ/OPQ on the sample: the baseline, and the student's warm start."""
from __future__ import annotations

import logging
import os
import time

import faiss
import ray

from pipeline import storage
from pipeline.index import build
from pipeline.stages.common import Group, Run, largest_node_cpus, pin_threads, placement

log = logging.getLogger("pipeline.stages.init")


@ray.remote
def _train_baseline(sample_uri: str, out_uri: str, index_cfg, niter: int, seed: int) -> dict:
    pin_threads()
    xt = storage.load_npz(sample_uri)["x"]
    t0 = time.time()
    index = build.train_baseline(xt, index_cfg, niter=niter, seed=seed)
    scratch = storage.local_scratch("init")
    local = os.path.join(scratch, "baseline.index")
    faiss.write_index(index, local)
    storage.upload_file(local, out_uri)
    return {"train_seconds": time.time() - t0, "n_train": len(xt)}


def run(run: Run) -> dict:
    cfg = run.cfg
    # k-means uses every core it is given: as many as the largest node of its group has.
    task = _train_baseline.options(num_cpus=largest_node_cpus(cfg, Group.CPU),
                                   resources=placement(cfg, Group.CPU))
    info = ray.get(task.remote(
        run.stage_path("ingest", "sample.npz"), run.stage_path("init", "baseline.index"),
        cfg.index, cfg.init.niter, cfg.init.seed))
    log.info("init: faiss baseline trained on %d vectors in %.1fs", info["n_train"],
             info["train_seconds"])
    return info
