"""teacher: the exact top-k of every training query over the corpus, with the neighbours'
vectors, as Parquet parts split by query id into training and validation. Training streams
the parts back through Ray Data."""
from __future__ import annotations

import logging
import time

from pipeline import storage
from pipeline.exact_knn import distributed_topk
from pipeline.stages.common import Run

log = logging.getLogger("pipeline.stages.teacher")


def run(run: Run) -> dict:
    t0 = time.time()
    plan = run.stage_info("ingest")
    q = storage.load_npz(run.stage_path("ingest", "train_queries.npz"))
    tr = run.cfg.train
    out = distributed_topk(run.cfg, plan["shards"], q["ids"], q["x"], run.cfg.teacher.k, True,
                           run.stage_path("teacher"), "teacher", split=(tr.val_fraction, tr.seed),
                           key=run.resume_key("teacher"))
    secs = time.time() - t0
    log.info("teacher: top-%d of %d queries over %d vectors in %.1fs (%.0f queries/s); "
             "%d for training, %d held out", run.cfg.teacher.k, len(q["ids"]), plan["n"], secs,
             len(q["ids"]) / secs, out["rows"]["train"], out["rows"]["val"])
    return {**out, "queries": len(q["ids"])}
