"""teacher: the exact top-k of every training query over the corpus, with the neighbours'
vectors, as Parquet parts split by query id into training and validation. Training streams
the parts back (pipeline.data.teacher_stream). The queries are read by tasks, block by block,
from the files ingest checked: the driver holds only the plan."""
from __future__ import annotations

import logging
import time

from pipeline.data.plan import plan_blocks
from pipeline.distributed.exact_knn import distributed_topk
from pipeline.index.knn import Band
from pipeline.stages.common import Run

F16_MAX = 65504.0  # the largest finite float16

log = logging.getLogger("pipeline.stages.teacher")


def run(run: Run) -> dict:
    t0 = time.time()
    plan = run.stage_info("ingest")
    blocks = [b.to_dict() for b in plan_blocks([tuple(f) for f in plan["train_query_files"]],
                                                run.cfg.teacher.query_block)]
    tr, te = run.cfg.train, run.cfg.teacher
    band = Band.of(te, tr.seed)
    # Neighbour vectors travel as float16, unless a coordinate would overflow it (inf, and
    # then masked as an empty slot): then as float32, at twice the bytes.
    wide = plan["max_abs"] > F16_MAX
    if wide:
        log.info("teacher: the corpus has coordinates up to %.4g, beyond float16's %g: "
                 "neighbour vectors are stored as float32", plan["max_abs"], F16_MAX)
    out = distributed_topk(run.cfg, plan["shards"], blocks, plan["d"], te.k,
                           run.stage_path("teacher"), "teacher",
                           with_vectors="float32" if wide else True,
                           split=(tr.val_fraction, tr.seed),
                           key=run.resume_key("teacher"), band=band,
                           # pseudo-queries (ingest's corpus samples) do not find themselves
                           exclude_self=not run.cfg.data.train_queries)
    out.pop("spans")  # ingest checked the ids
    n = plan["train_queries"]
    secs = time.time() - t0
    log.info("teacher: top-%d%s of %d queries over %d vectors in %.1fs (%.0f queries/s); "
             "%d for training, %d held out", te.k,
             f" and about {te.band_size} of ranks {te.k + 1}-{te.band_depth}" if band else "",
             n, plan["n"], secs,
             n / secs, out["rows"]["train"], out["rows"]["val"])
    return {**out, "queries": n}
