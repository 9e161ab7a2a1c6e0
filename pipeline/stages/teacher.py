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
from pipeline.workflow.results import Ingested, Taught
from pipeline.workflow.stage import Context, Stage

F16_MAX = 65504.0  # the largest finite float16

log = logging.getLogger("ivf_distill.stages.teacher")


def run(ctx: Context) -> Taught:
    t0 = time.time()
    plan: Ingested = ctx.inputs["ingest"]
    te = ctx.cfg.teacher
    blocks = [b.to_dict() for b in plan_blocks([tuple(f) for f in plan.train_query_files],
                                                te.query_block, columns=ctx.cfg.data.columns)]
    band = Band.of(te)
    # Neighbour vectors travel as float16, unless a coordinate would overflow it (inf, and
    # then masked as an empty slot): then as float32, at twice the bytes.
    wide = plan.max_abs > F16_MAX
    if wide:
        log.info("teacher: the corpus has coordinates up to %.4g, beyond float16's %g: "
                 "neighbour vectors are stored as float32", plan.max_abs, F16_MAX)
    out = distributed_topk(ctx.cfg.ray, ctx.cfg.data.metric, plan.shards, blocks, plan.d, te.k,
                           ctx.path(), "teacher",
                           with_vectors="float32" if wide else True,
                           split=(te.val_fraction, te.seed),
                           key=ctx.resume_key, band=band,
                           # pseudo-queries (ingest's corpus samples) do not find themselves
                           exclude_self=not ctx.cfg.data.train_queries)
    n = plan.train_queries
    secs = time.time() - t0
    log.info("teacher: top-%d%s of %d queries over %d vectors in %.1fs (%.0f queries/s, %d "
             "search workers, %.1f MB through the object store); %d for training, %d held out",
             te.k,
             f" and about {te.band_size} of ranks {te.k + 1}-{te.band_depth}" if band else "",
             n, plan.n, secs, n / secs, out["workers"], out["object_store_bytes"] / 1e6,
             out["rows"]["train"], out["rows"]["val"])
    # the spans need no keeping: ingest checked the ids
    return Taught(train=out["train"], val=out["val"], rows=out["rows"], queries=n,
                  workers=out["workers"], object_store_bytes=out["object_store_bytes"],
                  device=out["device"])


# teacher 2: pseudo-queries' lists no longer hold the query's own row. 3: typed result.
STAGE = Stage("teacher", sections=("teacher", "data"), needs=("ingest",), result=Taught,
              run=run, format=3)
