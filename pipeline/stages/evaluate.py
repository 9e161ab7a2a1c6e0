"""evaluate: the merged on-disk indexes answer the held-out queries; recall against the exact
neighbours (computed shard by shard) and, where labels exist, MRR and label recall. Each part
of an index is searched by its own task, and the parts' results are merged per query.

It searches the merge stage's output, the very files that publishing then places in a new
version, so the report describes the version it ships with."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import faiss
import numpy as np
import ray

from pipeline import storage
from pipeline.config import Baseline
from pipeline.data import readers
from pipeline.data.plan import Shard, plan_blocks
from pipeline.data.teacher_parts import load_parts
from pipeline.distributed.exact_knn import distributed_topk
from pipeline.distributed.placement import Group, memory, placement
from pipeline.distributed.tasks import check_unique_ids, pin_threads, wait_all
from pipeline.index import build, metrics, ondisk
from pipeline.index.knn import block_topk
from pipeline.workflow.results import Evaluated, Ingested, Merged
from pipeline.workflow.stage import METHODS, Context, Stage, method_names

log = logging.getLogger("ivf_distill.stages.evaluate")


# Queries of the first block searched once more on one thread, timed, per part and nprobe:
# the report's single-thread QPS and codes scanned per query, for choosing nprobe.
SPEED_QUERIES = 1000


@ray.remote
def _search_part(folder_uri: str, files: tuple[str, ...], gt_uris: list[str], k: int,
                 nprobes: tuple) -> dict:
    """One part of a merged index searched by the evaluation queries, block by block (each
    ground-truth part holds its block's queries and exact neighbours). files: the part's
    (data, header) pair, or its one fast-scan export. A task reads its part and nothing else
    of the index. Returns {"found": [{nprobe: (D, I)} per block], "bytes": the part's
    size, "speed": {nprobe: (seconds, queries, codes scanned)} of metrics.timed_search}."""
    pin_threads()
    with storage.scratch("eval") as scratch:
        folder = storage.local_folder(folder_uri, files, scratch)
        path = os.path.join(folder, files[-1])
        index = ondisk.read_ondisk(path) if len(files) == 2 else faiss.read_index(path)
        nbytes = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        found, speed = [], {}
        for b, uri in enumerate(gt_uris):
            xq = load_parts([uri])["xq"]
            block = {}
            for nprobe in nprobes:
                build.set_nprobe(index, nprobe)
                block[nprobe] = index.search(xq, k)
                if b == 0:  # the same queries in every part: the parts' costs add up
                    speed[nprobe] = metrics.timed_search(index, xq[:SPEED_QUERIES], k)
            found.append(block)
        del index
    return {"found": found, "bytes": nbytes, "speed": speed}


@ray.remote
def _score(gt_uris: list[str], k: int, metric: str, labels_uri: str, spans: dict,
           *parts: dict) -> dict:
    """The parts' results merged into the index's top k per query (each list lies in one
    part, so this is what the whole index answers), scored against the exact neighbours.
    Returns the metrics' sums ({"sums"}, pipeline.index.metrics.score_sums), the label check's
    counts ({"labels"}) and the bytes the part searches read: no query set or result list
    travels back to the driver."""
    pin_threads()
    qrels = readers.read_labels(labels_uri) if labels_uri else None
    sums, qids = {}, []
    for b, uri in enumerate(gt_uris):
        gt = load_parts([uri])
        found = {nprobe: ondisk.merge_results([p["found"][b][nprobe] for p in parts], k, metric)[1]
                 for nprobe in parts[0]["found"][b]}
        metrics.add_sums(sums, metrics.score_sums(found, gt["I"], gt["qids"], qrels))
        qids.append(gt["qids"])
    labels = label_misses(qrels, np.concatenate(qids), spans) if qrels else None
    speed = {nprobe: metrics.speed_of([p["speed"][nprobe] for p in parts])
             for nprobe in parts[0]["speed"]}
    return {"sums": sums, "labels": labels, "bytes": sum(p["bytes"] for p in parts),
            "speed": speed}


@ray.remote
def _compare_on_sample(sample_uri: str, trained: dict, queries_uri: str, max_queries: int,
                       k: int, nprobes: tuple, metric: str, *,
                       columns: tuple[str, str] = ("id", "embedding")) -> dict:
    """build.baseline=sample: each method's trained index over the training sample (ids
    0..n-1), searched by the evaluation queries against their exact neighbours in the
    sample. Returns {method: metric sums}. Memory: the sample, the queries and one index of
    the sample."""
    pin_threads()
    x = storage.load_npz(sample_uri)["x"]
    qids, xq = readers.read_all(queries_uri, "eval.queries", max_queries, columns)
    gt = block_topk(xq, x, np.arange(len(x)), k, metric)[1]
    out = {}
    for method, uri in trained.items():
        index = storage.read_index(uri)
        index.add(x)
        found = {}
        for nprobe in nprobes:
            build.set_nprobe(index, nprobe)
            found[nprobe] = index.search(xq, k)[1]
        out[method] = metrics.score_sums(found, gt, qids, None)
        del index
    return out


def label_misses(qrels: dict, qids: np.ndarray, spans: dict) -> tuple[int, int, int]:
    """(labels, of them naming a query not among `qids`, of them naming a document outside
    every corpus shard's id range): labels that can never be matched."""
    pairs = [(q, d) for q, docs in qrels.items() for d in docs]
    known_q = set(qids.tolist())
    # Spans sorted by start; a document is inside one iff it lies at or below the furthest
    # end among the spans that start at or before it (memory O(labels + shards)).
    lo_hi = np.array(sorted(spans.values()), dtype=np.int64).reshape(-1, 2)
    reach = np.maximum.accumulate(lo_hi[:, 1])
    docs = np.array([d for _, d in pairs], dtype=np.int64)
    at = np.searchsorted(lo_hi[:, 0], docs, side="right") - 1
    inside = (at >= 0) & (docs <= reach[np.maximum(at, 0)])
    return len(pairs), sum(q not in known_q for q, _ in pairs), int((~inside).sum())


def warn_label_misses(pairs: int, bad_q: int, bad_d: int) -> None:
    if bad_q or bad_d:
        log.warning("eval.labels: of %d labels, %d name a query that is not in "
                    "eval.queries and %d a document outside the corpus's ids; they can "
                    "never be found, and MRR and label recall count them as misses",
                    pairs, bad_q, bad_d)


def run(ctx: Context) -> Evaluated:
    """The exact neighbours of the evaluation queries, then one search task per method. The
    queries are read by tasks, block by block, as the teacher reads the training queries."""
    cfg = ctx.cfg
    plan: Ingested = ctx.inputs["ingest"]
    merged: Merged = ctx.inputs["merge"]
    files = readers.query_files("eval.queries", cfg.eval.queries, plan.d,
                                columns=cfg.data.columns)
    blocks = [b.to_dict() for b in plan_blocks(files, cfg.teacher.query_block,
                                                cfg.eval.max_queries, cfg.data.columns)]
    k = max(cfg.eval.k, 10)
    gt = distributed_topk(cfg.ray, cfg.data.metric, plan.shards, blocks, plan.d, k,
                          ctx.path("gt"), "evaluate: exact top-k of eval.queries",
                          key="" if ctx.fresh else truth_key(plan.shards, cfg.data.metric, k))
    check_unique_ids(cfg.ray, gt["spans"], blocks, "eval.queries")
    names = method_names(cfg.index)
    cpu = placement(cfg.ray, Group.CPU)
    # A search holds its part (a fast-scan export in memory; on-disk lists mapped), a query
    # block and its results for every block; the score task every part's results.
    nq = min(cfg.teacher.query_block, gt["rows"]["all"])
    per_part = max(i.files[f]["bytes"] for i in merged.indexes.values() for f in i.files)
    results_bytes = 12 * k * len(cfg.eval.nprobe) * gt["rows"]["all"]
    search = _search_part.options(resources=cpu, memory=memory(
        cfg.ray, Group.CPU, per_part + nq * 4 * plan.d + results_bytes))
    score = _score.options(resources=cpu, memory=memory(
        cfg.ray, Group.CPU, 2 * results_bytes * merged.parts))
    # (method, searched as fast-scan): the on-disk index; with build.fastscan, its fast-scan
    # export too (same codes, 8-bit quantized look-up tables: the rows show what that costs).
    variants = [(m, fs) for m in merged.indexes for fs in ((False, True) if cfg.build.fastscan
                                                            else (False,))]
    refs = []
    for m, fs in variants:
        index = merged.indexes[m]
        files = [(f,) for f in index.fastscan] if fs else \
            [(ondisk.data_file(h), h) for h in index.parts]
        found = [search.remote(index.uri, f, gt["all"], k, cfg.eval.nprobe) for f in files]
        refs.append(score.remote(gt["all"], k, cfg.data.metric, cfg.eval.labels, plan.spans,
                                 *found))
    if cfg.build.baseline == Baseline.SAMPLE:
        trained = {m: ctx.upstream(*where) for m, (where, _) in METHODS.items()}
        refs.append(_compare_on_sample.options(resources=placement(cfg.ray, Group.CPU)).remote(
            ctx.upstream("ingest", "sample.npz"), trained, cfg.eval.queries,
            cfg.eval.max_queries, k, cfg.eval.nprobe, cfg.data.metric,
            columns=cfg.data.columns))
    results = wait_all(refs, "evaluate: searches")
    on_sample = results.pop() if cfg.build.baseline == Baseline.SAMPLE else {}
    log.info("evaluate: the searches read %d bytes of index parts",
             sum(r["bytes"] for r in results))
    if results[0]["labels"]:
        warn_label_misses(*results[0]["labels"])
    rows = []
    for (method, fs), res in zip(variants, results):
        base = {"method": names[method] + ("-fs" if fs else ""),
                "bytes_per_vector": build.bytes_per_vector(cfg.index), "nlist": cfg.index.nlist}
        rows += [{**r, **res["speed"][r["nprobe"]]}
                 for r in metrics.rows_from_sums(res["sums"], base)]
    for method, sums in on_sample.items():  # named apart: they search the sample only
        base = {"method": names[method] + "-sample", "nlist": cfg.index.nlist,
                "bytes_per_vector": build.bytes_per_vector(cfg.index), "vectors": plan.sample}
        rows += metrics.rows_from_sums(sums, base)
    return Evaluated(rows=rows, queries=gt["rows"]["all"], exact_blocks=gt["searched"])


def truth_key(shards: list[dict], metric: str, k: int) -> str:
    """What the exact top-k of the evaluation queries depends on: the corpus shards (files,
    rows, ids, versions), the metric and k; each block's key adds its own query rows. The
    index, the sweep (eval.nprobe) and the training do not enter it, so a rerun that changes
    only them keeps the ground truth the last run wrote."""
    raw = json.dumps([[Shard(**s).key for s in shards], metric, k])
    return "truth-" + hashlib.sha256(raw.encode()).hexdigest()[:16]


# The evaluation queries and labels and the sweep (eval), with what names and sizes the rows
# (index, build) and the blocks its exact search reads the queries in (teacher.query_block).
STAGE = Stage("evaluate", sections=("eval", "index", "build", "teacher", "data"),
              needs=("ingest", "init", "export", "merge"), result=Evaluated, run=run)
