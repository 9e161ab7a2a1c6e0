"""teacher: exact top-k of the queries over every corpus shard, merged per query block.

Per query block: one task per shard finds its top-k (scores and ids only); merge tasks combine
them in a tree of fan-in MERGE_FANIN; then one task per shard returns the vectors of the
winning ids it holds, and a last task writes the block as Parquet. No task holds more than one
block's results, and neighbour vectors cross the cluster once.
Training streams those parts back through Ray Data.
"""
from __future__ import annotations

import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import storage
from pipeline.data import readers
from pipeline.data.plan import Shard
from pipeline.index.knn import block_topk, merge_topk, pick_device
from pipeline.stages.common import Run, pin_threads, wait_all

log = logging.getLogger("pipeline.stages.teacher")


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


def _fsl(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), int(np.prod(x.shape[1:])))


def teacher_table(qids, xq, S, I, V=None) -> pa.Table:
    """One row per query: qid, xq (d,), S (k,), I (k,) and, for training, V (k * d) float16."""
    cols = {"qid": pa.array(qids, pa.int64()), "xq": _fsl(xq.astype(np.float32)),
            "S": _fsl(S), "I": _fsl(I)}
    if V is not None:
        cols["V"] = _fsl(V.astype(np.float16))
    return pa.table(cols)


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor type, if it converted the column
        return np.asarray(col.to_numpy())
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


def table_arrays(table: pa.Table, names=("qid", "xq", "S", "I", "V")) -> dict:
    """numpy arrays of a teacher table: qids (n,), xq (n, d), S, I (n, k), V (n, k, d)."""
    out = {}
    for name in names:
        if name not in table.column_names:
            continue
        if name == "qid":
            out["qids"] = table.column("qid").to_numpy()
            continue
        out[name] = _column(table, name)
    if "V" in out:
        out["V"] = out["V"].reshape(len(out["V"]), out["S"].shape[1] if "S" in out
                                    else -1, out["xq"].shape[1])
    return out


def val_mask(qids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic held-out split by query id, the same in every block and every run."""
    with np.errstate(over="ignore"):
        h = (qids.astype(np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(40)) < np.uint64(int(fraction * (1 << 24)))


def _write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, write_page_checksum=True)
    storage.write_bytes(uri, buf.getvalue())


@ray.remote
def _write_block(out_dir: str, name: str, qids: np.ndarray, xq: np.ndarray, split: tuple | None,
                 merged: tuple, *gathered) -> dict:
    S, I = merged
    V = assemble_vectors(I, list(gathered), xq.shape[1]) if gathered else None
    table = teacher_table(qids, xq, S, I, V)
    if split is None:
        _write_table(table, storage.join(out_dir, name))
        return {"all": len(qids)}
    held = val_mask(qids, *split)
    _write_table(table.filter(pa.array(~held)), storage.join(out_dir, "train", name))
    _write_table(table.filter(pa.array(held)), storage.join(out_dir, "val", name))
    return {"train": int((~held).sum()), "val": int(held.sum())}


def distributed_topk(run: Run, shards: list[dict], qids: np.ndarray, xq: np.ndarray, k: int,
                     with_vectors: bool, out_dir: str, what: str,
                     split: tuple | None = None) -> dict:
    """Exact top-k of xq over every shard, as Parquet parts (teacher_table) per query block.

    Returns {"all": [uris]}, or with split=(val_fraction, seed) {"train": [uris], "val":
    [uris]}; and "rows": the row count of each.
    """
    metric = run.cfg.index.metric
    block = run.cfg.teacher.query_block
    gpus = run.cfg.ray.gpus_per_task
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


def load_parts(uris: list[str], limit: int = 0) -> dict:
    """Concatenates teacher parts into numpy arrays (for query sets that fit in memory:
    evaluation ground truth, the validation split); with `limit`, its first rows only, and
    no more parts are read than that takes."""
    tables, rows = [], 0
    for u in uris:
        if limit and rows >= limit:
            break
        tables.append(pq.read_table(io.BytesIO(storage.read_bytes(u))))
        rows += tables[-1].num_rows
    table = pa.concat_tables(tables)
    return table_arrays(table.slice(0, limit) if limit else table)


def run(run: Run) -> dict:
    t0 = time.time()
    plan = run.stage_info("ingest")
    q = storage.load_npz(run.stage_path("ingest", "train_queries.npz"))
    tr = run.cfg.train
    out = distributed_topk(run, plan["shards"], q["ids"], q["x"], run.cfg.teacher.k, True,
                           run.stage_path("teacher"), "teacher", split=(tr.val_fraction, tr.seed))
    secs = time.time() - t0
    log.info("teacher: top-%d of %d queries over %d vectors in %.1fs (%.0f queries/s); "
             "%d for training, %d held out", run.cfg.teacher.k, len(q["ids"]), plan["n"], secs,
             len(q["ids"]) / secs, out["rows"]["train"], out["rows"]["val"])
    return {**out, "queries": len(q["ids"])}
