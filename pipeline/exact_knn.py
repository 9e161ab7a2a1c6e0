"""Exact top-k of a query set over every corpus shard, as Ray tasks: the teacher's training
targets and the evaluation's ground truth.

Per query block: one task per shard finds its top-k (scores and ids only); merge tasks combine
them in a tree of fan-in MERGE_FANIN; then, for training, one task per shard returns the
vectors of the winning ids it holds, and a last task writes the block as a Parquet part
(pipeline.data.teacher_parts). No task holds more than one block's results, and neighbour
vectors cross the cluster once.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.data import readers, teacher_parts
from pipeline.data.plan import Shard
from pipeline.index.knn import block_topk, merge_topk, pick_device
from pipeline.stages.common import pin_threads, wait_all

MERGE_FANIN = 32  # per-shard results merged per task: bounds a merge task's memory


@ray.remote
def _search_shard(shard: dict, xq: np.ndarray, k: int, metric: str, gpus: float = 0.0):
    """(S, I) of this shard's top-k for a query block: scores and ids only, no vectors."""
    pin_threads()
    s = Shard(**shard)
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    S, I, _ = block_topk(xq, x, ids, k, metric, device=pick_device(gpus))
    return S, I


@ray.remote
def _merge_ids(k: int, *parts) -> tuple:
    S, I, _ = merge_topk([(S, I, None) for S, I in parts], k)
    return S, I


@ray.remote
def _gather_vectors(shard: dict, merged: tuple) -> tuple:
    """The vectors of this shard's rows among a block's merged top-k ids: (ids, float16 x)."""
    pin_threads()
    s = Shard(**shard)
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    keep = np.isin(ids, merged[1])
    return ids[keep], x[keep].astype(np.float16)


def assemble_vectors(I: np.ndarray, gathered: list[tuple], d: int) -> np.ndarray:
    """V (nq, k, d) float16 for the ids I (nq, k) from per-shard (ids, vectors); -1 -> 0."""
    ids = np.concatenate([g[0] for g in gathered])
    vecs = np.concatenate([g[1] for g in gathered]) if len(ids) else np.zeros((0, d), np.float16)
    order = np.argsort(ids)
    ids, vecs = ids[order], vecs[order]
    V = np.zeros(I.shape + (d,), np.float16)
    valid = I >= 0
    at = np.searchsorted(ids, I[valid])
    assert (ids[at] == I[valid]).all(), "a top-k id was not found in any shard"
    V[valid] = vecs[at]
    return V


def _tree_merge(parts: list, k: int):
    """Merges per-shard (S, I) refs in groups of MERGE_FANIN, in order (ties resolve as in one
    flat merge: earlier shards first). Returns one ref to the block's (S, I)."""
    while len(parts) > 1:
        parts = [_merge_ids.remote(k, *parts[i:i + MERGE_FANIN])
                 for i in range(0, len(parts), MERGE_FANIN)]
    return parts[0]


@ray.remote
def _write_block(out_dir: str, name: str, qids: np.ndarray, xq: np.ndarray, split: tuple | None,
                 merged: tuple, *gathered) -> dict:
    S, I = merged
    V = assemble_vectors(I, list(gathered), xq.shape[1]) if gathered else None
    table = teacher_parts.teacher_table(qids, xq, S, I, V)
    if split is None:
        teacher_parts.write_table(table, storage.join(out_dir, name))
        return {"all": len(qids)}
    held = teacher_parts.val_mask(qids, *split)
    teacher_parts.write_table(table.filter(pa.array(~held)), storage.join(out_dir, "train", name))
    teacher_parts.write_table(table.filter(pa.array(held)), storage.join(out_dir, "val", name))
    return {"train": int((~held).sum()), "val": int(held.sum())}


def distributed_topk(cfg: PipelineConfig, shards: list[dict], qids: np.ndarray, xq: np.ndarray,
                     k: int, with_vectors: bool, out_dir: str, what: str,
                     split: tuple | None = None) -> dict:
    """Exact top-k of xq over every shard, as Parquet parts (teacher_table) per query block.

    Returns {"all": [uris]}, or with split=(val_fraction, seed) {"train": [uris], "val":
    [uris]}; and "rows": the row count of each.
    """
    metric = cfg.index.metric
    block = cfg.teacher.query_block
    gpus = cfg.ray.gpus_per_task
    search = _search_shard.options(num_gpus=gpus) if gpus else _search_shard
    names, merges = [], []
    for b, q0 in enumerate(range(0, len(xq), block)):
        q_ref = ray.put(np.ascontiguousarray(xq[q0:q0 + block]))
        merged = _tree_merge([search.remote(s, q_ref, k, metric, gpus) for s in shards], k)
        # Only the winners' vectors travel: Q·k·d values, however many shards there are.
        gathered = [_gather_vectors.remote(s, merged) for s in shards] if with_vectors else []
        name = f"part-{b:05d}.parquet"
        merges.append(_write_block.remote(out_dir, name, qids[q0:q0 + block], q_ref, split,
                                          merged, *gathered))
        names.append(name)
    counts = wait_all(merges, f"{what}: query blocks")
    groups = ["all"] if split is None else ["train", "val"]
    out = {g: [storage.join(out_dir, name) if g == "all" else storage.join(out_dir, g, name)
               for name in names] for g in groups}
    out["rows"] = {g: sum(c[g] for c in counts) for g in groups}
    return out
