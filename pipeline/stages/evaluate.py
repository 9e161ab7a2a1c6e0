"""evaluate: the merged on-disk indexes answer the held-out queries; recall against the exact
neighbours (computed shard by shard) and, where labels exist, MRR and label recall.

It searches the merge stage's output, the very files that publishing then places in a new
version, so the report describes the version it ships with."""
from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import ray

from pipeline import storage
from pipeline.data import readers
from pipeline.data.teacher_parts import load_parts
from pipeline.exact_knn import distributed_topk
from pipeline.index import build, metrics, ondisk
from pipeline.stages.common import (
    METHODS,
    Group,
    Run,
    method_names,
    pin_threads,
    placement,
    wait_all,
)

log = logging.getLogger("pipeline.stages.evaluate")


@ray.remote
def _search_merged(folder_uri: str, xq: np.ndarray, k: int, nprobes: tuple) -> dict:
    pin_threads()
    scratch = storage.local_scratch("eval")
    for name in ("index.ivfdata", "index.index"):
        storage.download_file(storage.join(folder_uri, name), os.path.join(scratch, name))
    index = ondisk.read_ondisk(os.path.join(scratch, "index.index"))
    out = {}
    for nprobe in nprobes:
        build.set_nprobe(index, nprobe)
        out[nprobe] = index.search(xq, k)[1]
    del index
    shutil.rmtree(scratch)
    return out


def check_labels(qrels: dict, qids: np.ndarray, spans: dict) -> None:
    """Warns, with counts, about labels that can never be matched: a query id not among the
    eval queries, or a document id outside every corpus shard's id range."""
    pairs = [(q, d) for q, docs in qrels.items() for d in docs]
    known_q = set(qids.tolist())
    # Spans sorted by start; a document is inside one iff it lies at or below the furthest
    # end among the spans that start at or before it (memory O(labels + shards)).
    lo_hi = np.array(sorted(spans.values()), dtype=np.int64).reshape(-1, 2)
    reach = np.maximum.accumulate(lo_hi[:, 1])
    docs = np.array([d for _, d in pairs], dtype=np.int64)
    at = np.searchsorted(lo_hi[:, 0], docs, side="right") - 1
    inside = (at >= 0) & (docs <= reach[np.maximum(at, 0)])
    bad_q = sum(q not in known_q for q, _ in pairs)
    bad_d = int((~inside).sum())
    if bad_q or bad_d:
        log.warning("data.labels: of %d labels, %d name a query that is not in "
                    "data.eval_queries and %d a document outside the corpus's ids; they can "
                    "never be found, and MRR and label recall count them as misses",
                    len(pairs), bad_q, bad_d)


def run(run: Run) -> dict:
    cfg = run.cfg
    qids, xq = readers.read_all(cfg.data.eval_queries, "data.eval_queries",
                                cfg.data.max_eval_queries)
    plan = run.stage_info("ingest")
    k = max(cfg.eval.k, 10)
    gt = load_parts(distributed_topk(cfg, plan["shards"], qids, xq, k, False,
                                     run.stage_path("evaluate", "gt"),
                                     "evaluate: exact top-k",
                                     key=run.resume_key("evaluate"))["all"])
    qrels = readers.read_labels(cfg.data.labels) if cfg.data.labels else None
    if qrels:
        check_labels(qrels, qids, plan["spans"])
    names = method_names(cfg)
    merged = run.stage_info("merge")
    search = _search_merged.options(resources=placement(cfg, Group.CPU))
    refs = [search.remote(merged[m]["uri"], xq, k, cfg.eval.nprobe) for m in METHODS]
    results = wait_all(refs, "evaluate: searches")
    rows = []
    for method, res in zip(METHODS, results):
        base = {"method": names[method], "bytes_per_vector": build.bytes_per_vector(cfg.index),
                "nlist": cfg.index.nlist}
        rows += metrics.score_rows(res, gt["I"], qids, qrels, base)
    return {"rows": rows, "queries": len(qids)}
