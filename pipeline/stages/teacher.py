"""teacher: exact top-k of the queries over every corpus shard, merged per query block.

Tasks are (shard x query block); a merge task per query block combines the shards' results
and writes them to the run folder, so no single process holds all teacher results.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import ray

from pipeline import storage
from pipeline.data import readers
from pipeline.data.plan import Shard
from pipeline.index.knn import block_topk, merge_topk, pick_device
from pipeline.stages.common import Run, pin_threads, wait_all

log = logging.getLogger("pipeline.stages.teacher")


@ray.remote
def _search_shard(shard: dict, xq: np.ndarray, k: int, metric: str, with_vectors: bool,
                  gpus: float = 0.0):
    pin_threads()
    s = Shard(**shard)
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    return block_topk(xq, x, ids, k, metric, with_vectors, device=pick_device(gpus))


@ray.remote
def _merge_block(out_uri: str, k: int, qids: np.ndarray, xq: np.ndarray, *parts) -> int:
    S, I, V = merge_topk(list(parts), k)
    arrays = {"qids": qids, "xq": xq, "S": S, "I": I}
    if V is not None:
        arrays["V"] = V
    storage.save_npz(out_uri, **arrays)
    return len(qids)


def distributed_topk(run: Run, shards: list[dict], qids: np.ndarray, xq: np.ndarray, k: int,
                     with_vectors: bool, out_dir: str, what: str) -> list[str]:
    """Writes out_dir/part-XXXXX.npz (qids, xq, S, I[, V]) per query block; returns the URIs."""
    metric = run.cfg.index.metric
    block = run.cfg.teacher.query_block
    gpus = run.cfg.ray.gpus_per_task
    search = _search_shard.options(num_gpus=gpus) if gpus else _search_shard
    uris, merges = [], []
    for b, q0 in enumerate(range(0, len(xq), block)):
        q_ref = ray.put(np.ascontiguousarray(xq[q0:q0 + block]))
        parts = [search.remote(s, q_ref, k, metric, with_vectors, gpus) for s in shards]
        uri = storage.join(out_dir, f"part-{b:05d}.npz")
        merges.append(_merge_block.remote(uri, k, qids[q0:q0 + block], q_ref, *parts))
        uris.append(uri)
    wait_all(merges, f"{what}: query blocks")
    return uris


def load_parts(uris: list[str]) -> dict:
    """Concatenates teacher parts (fine for the query counts a training run uses)."""
    parts = [storage.load_npz(u) for u in uris]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run(run: Run) -> dict:
    t0 = time.time()
    plan = run.stage_info("ingest")
    q = storage.load_npz(run.stage_path("ingest", "train_queries.npz"))
    uris = distributed_topk(run, plan["shards"], q["ids"], q["x"], run.cfg.teacher.k, True,
                            run.stage_path("teacher"), "teacher")
    secs = time.time() - t0
    log.info("teacher: top-%d of %d queries over %d vectors in %.1fs (%.0f queries/s)",
             run.cfg.teacher.k, len(q["ids"]), plan["n"], secs, len(q["ids"]) / secs)
    return {"parts": uris, "queries": len(q["ids"])}
