"""Exact top-k of a query set over every corpus shard, as Ray tasks: the teacher's training
targets and the evaluation's ground truth.

The query set comes as blocks (pipeline.data.plan.plan_blocks): a task reads each block from
storage, so the driver never holds the queries. Shards outer, query blocks inner (as faiss's
knn_ground_truth): one task per shard reads it once and searches every query block against
it, returning one result per block: scores, ids and, for training, the vectors of its own
top-k (taken from that same read). Per block, merge tasks combine the shards' results in a
tree of fan-in MERGE_FANIN, keeping the winners' vectors, and a last task writes the block as
a Parquet part (pipeline.data.teacher_parts) with a marker beside it. A rerun under the same
stage key finds the markers and searches only the blocks still missing (a killed teacher
resumes).

Memory: a shard task holds its shard, the query blocks and one result per block (nq * k *
(12 + 2d) bytes over all blocks; with a band, k grows by the most drawn of any query, about
band_size + 3 sqrt(band_size), plus 4 * band_depth bytes of cut-off scores per query); a
merge task two results of one block.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.config import RayConfig
from pipeline.data import readers, teacher_parts
from pipeline.data.plan import Shard
from pipeline.distributed.placement import Group, placement
from pipeline.distributed.tasks import pin_threads, wait_all
from pipeline.index.knn import Band, block_topk, finish, merge_topk, pick_device

log = logging.getLogger("pipeline.exact_knn")

MERGE_FANIN = 32  # per-shard results merged per task: bounds a merge task's memory


@ray.remote
def _search_shard(shard: dict, k: int, metric: str, gpus: float, with_vectors: bool,
                  band: Band | None, exclude_self: bool, *q_blocks: np.ndarray):
    """(S, I, V or None) of this shard's top-k for each query block (with a band, the partial
    (S, I, V, U, T)), one return value each; the shard is read once. q_blocks: each block's
    ids, then its vectors. exclude_self: block_topk's (the queries are corpus samples)."""
    pin_threads()
    s = Shard(**shard)
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    device = pick_device(gpus)
    n = len(q_blocks) // 2
    out = [block_topk(q, x, ids, k, metric, with_vectors, device=device, band=band, qids=qids,
                      exclude_self=exclude_self)
           for qids, q in zip(q_blocks[:n], q_blocks[n:])]
    return out[0] if len(out) == 1 else tuple(out)


@ray.remote(num_returns=2)
def _read_block(block: dict, d: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, x) of one query block, checked as ingest checks the corpus."""
    b = Shard(**block)
    ids, x = readers.read_rows(b.uri, b.start, b.stop, b.id_offset)
    readers.check_block(ids, x, f"{what}: {b.uri} rows {b.start}-{b.stop}", d)
    return ids, np.ascontiguousarray(x)


@ray.remote
def _merge(k: int, band: Band | None, parts: list) -> tuple:
    """The top-k of results fetched one at a time: refs inside a list reach a task
    unresolved, so it holds two results at once whatever the fan-in (docs/scale.md measured
    what holding them all cost). Merging in order keeps the ties of one flat merge: earlier
    shards first."""
    merged = None
    for ref in parts:
        part = ray.get(ref)
        merged = part if merged is None else merge_topk([merged, part], k, band)
    return merged


def _tree_merge(merge, parts: list, k: int, band: Band | None):
    """Merges per-shard result refs in groups of MERGE_FANIN, in order. Returns one ref to
    the block's merged result."""
    while len(parts) > 1:
        parts = [merge.remote(k, band, parts[i:i + MERGE_FANIN])
                 for i in range(0, len(parts), MERGE_FANIN)]
    return parts[0]


@ray.remote
def _write_block(out_dir: str, name: str, qids: np.ndarray, xq: np.ndarray, split: tuple | None,
                 key: str, band: Band | None, merged: tuple) -> dict:
    S, I, V = finish(merged, band)
    table = teacher_parts.teacher_table(qids, xq, S, I, V)
    if split is None:
        teacher_parts.write_table(table, storage.join(out_dir, name))
        counts = {"all": len(qids)}
    else:
        held = teacher_parts.val_mask(qids, *split)
        teacher_parts.write_table(table.filter(pa.array(~held)),
                                  storage.join(out_dir, "train", name))
        teacher_parts.write_table(table.filter(pa.array(held)),
                                  storage.join(out_dir, "val", name))
        counts = {"train": int((~held).sum()), "val": int(held.sum())}
    counts["span"] = [int(qids.min()), int(qids.max())]
    storage.write_json(_marker(out_dir, name), {"key": key, "counts": counts})  # written last
    return counts


def _marker(out_dir: str, name: str) -> str:
    return storage.join(out_dir, "_done", name.replace(".parquet", ".json"))


def _finished(out_dir: str, name: str, key: str) -> dict | None:
    """The counts of a block written under this very key (which names the block's rows),
    or None."""
    if not key:
        return None
    try:
        done = storage.read_json(_marker(out_dir, name))
    except FileNotFoundError:
        return None
    return done["counts"] if done.get("key") == key else None


def distributed_topk(cfg: RayConfig, metric: str, shards: list[dict], blocks: list[dict],
                     d: int, k: int, out_dir: str, what: str, *, with_vectors: bool | str = False,
                     split: tuple | None = None, key: str = "", band: Band | None = None,
                     exclude_self: bool = False) -> dict:
    """Exact top-k of the query blocks (Shard dicts, `what` names their setting in errors)
    over every shard, as Parquet parts (teacher_table), one per block; with a `band`, each
    query's drawn deeper neighbours follow its top k (pipeline.index.knn.Band).

    Returns {"all": [uris]}, or with split=(val_fraction, seed) {"train": [uris], "val":
    [uris]}; "rows": the row count of each; "spans": each block's (id_min, id_max). With a
    `key` (the stage's), blocks already written under it are kept. exclude_self: the
    queries are corpus samples, and a query's own row is no neighbour (knn.without_self).
    """
    gpus = cfg.gpus_per_task
    # Exact search is the GPU group's work, like training; the reads, merges and writes go
    # with it, beside the search results they read.
    where = placement(cfg, Group.GPU)
    names = [f"part-{b:05d}.parquet" for b in range(len(blocks))]
    # A block's marker counts only for the very rows it was written from.
    keys = [f"{key}|{Shard(**b).key}" if key else "" for b in blocks]
    counts = [_finished(out_dir, name, bkey) for name, bkey in zip(names, keys)]
    todo = [b for b, c in enumerate(counts) if c is None]
    if len(todo) < len(blocks):
        log.info("%s: resuming: %d of %d query blocks already done", what,
                 len(blocks) - len(todo), len(blocks))
    if todo:
        read = _read_block.options(resources=where)
        q_refs = [read.remote(blocks[b], d, what) for b in todo]  # [(ids, x)] refs
        search = _search_shard.options(num_gpus=gpus, resources=where, num_returns=len(todo))
        q_args = [i for i, _ in q_refs] + [x for _, x in q_refs]
        per_shard = [search.remote(s, k, metric, gpus, with_vectors, band, exclude_self, *q_args)
                     for s in shards]
        if len(todo) == 1:
            per_shard = [[r] for r in per_shard]
        merge = _merge.options(resources=where)
        write = _write_block.options(resources=where)
        writes = [write.remote(out_dir, names[b], ids, x, split, keys[b], band,
                               _tree_merge(merge, [r[j] for r in per_shard], k, band))
                  for j, (b, (ids, x)) in enumerate(zip(todo, q_refs))]
        for b, c in zip(todo, wait_all(writes, f"{what}: query blocks")):
            counts[b] = c
    groups = ["all"] if split is None else ["train", "val"]
    out = {g: [storage.join(out_dir, name) if g == "all" else storage.join(out_dir, g, name)
               for name in names] for g in groups}
    out["rows"] = {g: sum(c[g] for c in counts) for g in groups}
    out["spans"] = [c["span"] for c in counts]
    return out
