"""Exact top-k of a query set over every corpus shard, with Ray: the teacher's training
targets and the evaluation's ground truth.

Search workers (actors, `ray.teacher_workers` of them: by default one per node of the GPU
group, or one per GPU) each take a contiguous run of the shards. A worker reads each of its
shards once, keeps its vectors on its node (a scratch file), and searches every query block
against it, keeping per block a running top-k of ids and scores only. Per block, the workers'
results merge in a tree of fan-in MERGE_FANIN; the vectors of the final winners (the top k
and the band) then come from the workers whose shards hold them, and a last task writes the
block as a Parquet part (pipeline.data.teacher_parts) with a marker beside it. A rerun under
the same stage key finds the markers and searches only the blocks still missing.

So the bytes that pass through the object store grow with workers x queries (ids and scores)
plus queries x winners (vectors), never with shards x queries; the corpus is read once. Runs
are contiguous and merged in order, so ties fall as in one flat search, earlier shards first,
and any number of workers gives the same lists.

Memory: a worker holds the query blocks, a running result per block (nq * (k + band) * 20
bytes, plus 4 * band_depth bytes of cut-off scores per query) and one shard at a time; its
shards' vectors wait on local disk until the winners are gathered.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.config import RayConfig
from pipeline.data import readers, teacher_parts
from pipeline.data.plan import Shard
from pipeline.distributed.autoscale import autoscaler_runs
from pipeline.distributed.placement import Group, group_nodes, memory, placement
from pipeline.distributed.tasks import pin_threads, wait_all
from pipeline.index import gpu
from pipeline.index.knn import Band, block_topk, finish, merge_topk, pick_device

log = logging.getLogger("ivf_distill.exact_knn")

MERGE_FANIN = 32  # worker results merged per task: bounds a merge task's memory
PROGRESS_EVERY = 30.0  # seconds between a search worker's progress lines
ATTEMPTS = 3  # tries of the blocks left when a search worker is lost


def _nbytes(result) -> int:
    return sum(a.nbytes for a in result if isinstance(a, np.ndarray))


@ray.remote
class _Searcher:
    """One search worker over its run of shards (see the module doc)."""

    def __init__(self, k: int, metric: str, gpus: float, band: Band | None,
                 exclude_self: bool, keep_vectors: bool, threads: int):
        # Its progress lines reach the driver's console through Ray's log forwarding; a worker
        # process has no logging handler of its own.
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        self.k, self.metric, self.band, self.threads = k, metric, band, threads
        self.exclude_self, self.keep = exclude_self, keep_vectors
        self.device = pick_device(gpus)
        self.folder = tempfile.mkdtemp(prefix="ivf-distill-search-")
        self.held = []  # per shard read: (its ids sorted, their rows, its vectors' file)

    def where(self) -> str:
        """The device it searches on and the library that does it."""
        import torch

        return f"{self.device}; " + (gpu.library() if self.device == "cpu" else
                                     f"torch {torch.__version__}")

    def search(self, shards: list[dict], *q_blocks: np.ndarray):
        """Per query block, the top-k (with a band, the partial result) of its queries over
        this worker's shards, ids and scores only, one return value each; then the bytes
        returned. q_blocks: each block's ids, then its vectors."""
        pin_threads(self.threads)
        n = len(q_blocks) // 2
        running = [None] * n
        t0 = last = time.time()
        for i, shard in enumerate(shards):
            if i and time.time() - last >= PROGRESS_EVERY:  # a worker's run can take hours
                last = time.time()
                log.info("search worker: %d/%d shards searched, %.0fs elapsed, ETA %.0fs", i,
                         len(shards), last - t0, (last - t0) / i * (len(shards) - i))
            s = Shard(**shard)
            ids, x = readers.read_shard(s)
            if self.keep:
                self._hold(ids, x)
            for b, (qids, q) in enumerate(zip(q_blocks[:n], q_blocks[n:])):
                r = block_topk(q, x, ids, self.k, self.metric, False, device=self.device,
                               band=self.band, qids=qids, exclude_self=self.exclude_self)
                running[b] = r if running[b] is None else \
                    merge_topk([running[b], r], self.k, self.band)
            del x
        return (*running, sum(_nbytes(r) for r in running))

    def _hold(self, ids: np.ndarray, x: np.ndarray) -> None:
        path = os.path.join(self.folder, f"{len(self.held)}.npy")
        np.save(path, x)
        order = np.argsort(ids, kind="stable")
        self.held.append((ids[order], order, path))

    def vectors(self, I: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
        """(positions in I.ravel(), their vectors as `dtype`) of the ids in I that this
        worker's shards hold."""
        flat = I.ravel()
        pos, vecs = [], []
        for ids, order, path in self.held:
            j = np.minimum(np.searchsorted(ids, flat), len(ids) - 1)
            hit = np.flatnonzero((ids[j] == flat) & (flat >= 0))
            if len(hit):
                rows = order[j[hit]]
                x = np.load(path, mmap_mode="r")
                pos.append(hit)
                vecs.append(np.asarray(x[rows], dtype=dtype))
        if not pos:
            return np.zeros(0, np.int64), np.zeros((0, 0), dtype)
        return np.concatenate(pos), np.concatenate(vecs)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@ray.remote(num_returns=2)
def _read_block(block: dict, d: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, x) of one query block, checked as ingest checks the corpus."""
    b = Shard(**block)
    ids, x = readers.read_shard(b)
    readers.check_block(ids, x, f"{what}: {b.uri} rows {b.start}-{b.stop}", d)
    return ids, np.ascontiguousarray(x)


@ray.remote(num_returns=2)
def _merge(k: int, band: Band | None, parts: list) -> tuple:
    """The top-k of results fetched one at a time (refs inside a list reach a task
    unresolved, so it holds two results at once whatever the fan-in), and the bytes it
    fetched. Merging in order keeps the ties of one flat merge: earlier shards first."""
    merged, fetched = None, 0
    for ref in parts:
        part = ray.get(ref)
        fetched += _nbytes(part)
        merged = part if merged is None else merge_topk([merged, part], k, band)
    return merged, fetched


def _tree_merge(merge, parts: list, k: int, band: Band | None, counts: list):
    """Merges per-worker result refs in groups of MERGE_FANIN, in order. Returns one ref to
    the block's merged result; appends each merge's fetched-bytes ref to `counts`."""
    while len(parts) > 1:
        level = [merge.remote(k, band, parts[i:i + MERGE_FANIN])
                 for i in range(0, len(parts), MERGE_FANIN)]
        parts = [m for m, _ in level]
        counts += [c for _, c in level]
    return parts[0]


@ray.remote(num_returns=2)
def _winners(merged: tuple, band: Band | None) -> tuple[np.ndarray, np.ndarray]:
    """(S, I) of a block's final lists (knn.finish)."""
    S, I, _ = finish(merged, band)
    return S, I


@ray.remote
def _write_block(out_dir: str, name: str, qids: np.ndarray, xq: np.ndarray, split: tuple | None,
                 key: str, S: np.ndarray, I: np.ndarray, dtype: str | None,
                 parts: list) -> dict:
    """Writes a block's lists, with the winners' vectors gathered from the workers' `parts`
    (refs of (positions, vectors)); returns its counts and the bytes it fetched."""
    fetched = S.nbytes + I.nbytes
    V = None
    if dtype is not None:
        V = np.full((I.size, xq.shape[1]), np.nan, dtype=dtype)
        for ref in parts:
            pos, vecs = ray.get(ref)
            fetched += pos.nbytes + vecs.nbytes
            V[pos] = vecs
        V = V.reshape(*I.shape, xq.shape[1])
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
    return {**counts, "fetched": fetched}


def _marker(out_dir: str, name: str) -> str:
    return storage.join(out_dir, "_done", name.replace(".parquet", ".json"))


def _finished(out_dir: str, name: str, key: str, resume: bool = True) -> dict | None:
    """The counts of a block written under this very key (which names the block's rows),
    or None. Without a key nothing an earlier run left is resumed; resume=False: the block
    may have been written by this very call, under any key."""
    if not key and resume:
        return None
    try:
        done = storage.read_json(_marker(out_dir, name))
    except FileNotFoundError:
        return None
    return done["counts"] if done.get("key") == key else None


def search_workers(cfg: RayConfig, shards: int) -> tuple[int, float, int]:
    """(workers, CPUs each, threads each): ray.teacher_workers, or one per GPU
    (ray.gpus_per_task > 0) or per node of the GPU group; never more than the shards. A
    worker holds its CPUs until the last block is written, so the workers of a node leave one
    CPU of it to the reads, merges and writes of the blocks; those run after the search,
    so the search itself takes the node's every core (threads)."""
    nodes = [n for n in group_nodes(cfg, Group.GPU) if n["Resources"].get("CPU", 0) > 0]
    if cfg.teacher_workers:
        workers = cfg.teacher_workers
    elif cfg.gpus_per_task:
        gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        workers = int(gpus / cfg.gpus_per_task) or len(nodes)
    else:
        workers = len(nodes)
    workers = max(1, min(workers, shards))
    smallest = min((int(n["Resources"]["CPU"]) for n in nodes), default=2)
    per_node = -(-workers // max(len(nodes), 1))
    share = max(smallest - 1, 0.5) / per_node  # a fraction where workers outnumber CPUs
    return workers, int(share) if share >= 1 else share, max(1, smallest // per_node)


def _lost_worker(e: BaseException) -> bool:
    """Whether a failure is (or was caused by) a search worker's death."""
    while e is not None:
        if isinstance(e, ray.exceptions.RayActorError):
            return True
        e = getattr(e, "cause", None) or e.__cause__
    return False


def distributed_topk(cfg: RayConfig, metric: str, shards: list[dict], blocks: list[dict],
                     d: int, k: int, out_dir: str, what: str, *, with_vectors: bool | str = False,
                     split: tuple | None = None, key: str = "", band: Band | None = None,
                     exclude_self: bool = False) -> dict:
    """Exact top-k of the query blocks (Shard dicts, `what` names their setting in errors)
    over every shard, as Parquet parts (teacher_table), one per block; with a `band`, each
    query's drawn deeper neighbours follow its top k (pipeline.index.knn.Band).

    Returns {"all": [uris]}, or with split=(val_fraction, seed) {"train": [uris], "val":
    [uris]}; "rows": the row count of each; "spans": each block's (id_min, id_max);
    "object_store_bytes": what the search results, merges and gathered vectors moved through
    the object store in this call (the query blocks included); "workers"; "searched": the
    blocks this call searched. With a `key`, blocks already written under it are kept.
    exclude_self: the queries are corpus
    samples, and a query's own row is no neighbour (knn.without_self).
    """
    names = [f"part-{b:05d}.parquet" for b in range(len(blocks))]
    # A block's marker counts only for the very rows it was written from.
    keys = [f"{key}|{Shard(**b).key}" if key else "" for b in blocks]
    counts = [_finished(out_dir, name, bkey) for name, bkey in zip(names, keys)]
    todo = [b for b, c in enumerate(counts) if c is None]
    if len(todo) < len(blocks):
        log.info("%s: resuming: %d of %d query blocks already done", what,
                 len(blocks) - len(todo), len(blocks))
    moved, workers, devices, searched = 0, 0, [], len(todo)
    for attempt in range(ATTEMPTS):
        if not todo:
            break
        try:
            workers, got, moved_now, devices = _search(
                cfg, metric, shards, blocks, todo, d, k, out_dir, names, keys, what,
                with_vectors, split, band, exclude_self)
        except ray.exceptions.RayError as e:
            if not _lost_worker(e) or attempt + 1 == ATTEMPTS:
                raise
            log.warning("%s: a search worker was lost (%s); the blocks not yet written are "
                        "searched again", what, type(e).__name__)
            for b in todo:  # blocks written before the loss are kept
                counts[b] = _finished(out_dir, names[b], keys[b], resume=False)
            todo = [b for b in todo if counts[b] is None]
            continue
        moved += moved_now
        for b, c in got.items():
            counts[b] = c
        break
    groups = ["all"] if split is None else ["train", "val"]
    out = {g: [storage.join(out_dir, name) if g == "all" else storage.join(out_dir, g, name)
               for name in names] for g in groups}
    out["rows"] = {g: sum(c[g] for c in counts) for g in groups}
    out["spans"] = [c["span"] for c in counts]
    out["object_store_bytes"], out["workers"], out["searched"] = moved, workers, searched
    out["device"] = ", ".join(sorted(set(devices))) or "nothing left to search"
    return out


def _search(cfg: RayConfig, metric: str, shards: list[dict], blocks: list[dict],
            todo: list[int], d: int, k: int, out_dir: str, names: list, keys: list, what: str,
            with_vectors, split, band, exclude_self) -> tuple[int, dict, int, list]:
    """One pass of search workers over the blocks `todo`: (workers, {block: counts}, bytes
    moved through the object store, each worker's device)."""
    gpus = cfg.gpus_per_task
    # Exact search is the GPU group's work, like training; the reads, merges and writes go
    # with it, beside the search results they read.
    where = placement(cfg, Group.GPU)
    workers, cpus, threads = search_workers(cfg, len(shards))
    if not cfg.teacher_workers and autoscaler_runs():
        log.warning("%s: ray.teacher_workers=0 on an autoscaling cluster: %d search workers, "
                    "from the GPU group's nodes up now; set ray.teacher_workers to size it",
                    what, workers)
    dtype = None if not with_vectors else "float16" if with_vectors is True else with_vectors
    read = _read_block.options(resources=where)
    q_refs = [read.remote(blocks[b], d, what) for b in todo]  # [(ids, x)] refs
    q_args = [i for i, _ in q_refs] + [x for _, x in q_refs]
    runs = [shards[len(shards) * w // workers:len(shards) * (w + 1) // workers]
            for w in range(workers)]
    # A worker holds one shard (as read and as float32), the query blocks, and per query a
    # running result, the shard's and their merge: depth columns of score, row and id.
    depth = band.depth if band else k
    queries = sum(blocks[b]["stop"] - blocks[b]["start"] for b in todo)
    rows = max(sh["stop"] - sh["start"] for sh in shards)
    need = 8 * rows * d + queries * (4 * d + 8) + 3 * queries * depth * 20
    actors = [_Searcher.options(num_cpus=cpus, num_gpus=gpus, resources=where,
                                memory=memory(cfg, Group.GPU, need),
                                scheduling_strategy="SPREAD").remote(
        k, metric, gpus, band, exclude_self, dtype is not None, threads) for _ in runs]
    try:
        devices = ray.get([a.where.remote() for a in actors])
        per_worker = [a.search.options(num_returns=len(todo) + 1).remote(run, *q_args)
                      for a, run in zip(actors, runs)]
        merged_bytes = [r[-1] for r in per_worker]
        # a merge holds two results of one block and their merge
        most = max(blocks[b]["stop"] - blocks[b]["start"] for b in todo)
        merge = _merge.options(resources=where,
                               memory=memory(cfg, Group.GPU, 3 * most * depth * 20))
        winners = _winners.options(resources=where)
        write = _write_block.options(resources=where)
        writes = []
        for j, (b, (ids, x)) in enumerate(zip(todo, q_refs)):
            merged = _tree_merge(merge, [r[j] for r in per_worker], k, band, merged_bytes)
            S, I = winners.remote(merged, band)
            parts = [a.vectors.remote(I, dtype) for a in actors] if dtype else []
            writes.append(write.remote(out_dir, names[b], ids, x, split, keys[b], S, I, dtype,
                                       parts))
        done = wait_all(writes, f"{what}: query blocks ({workers} search workers)")
        moved = sum(ray.get(merged_bytes)) + sum(c.pop("fetched") for c in done)
        moved += sum((blocks[b]["stop"] - blocks[b]["start"]) * (4 * d + 8) for b in todo)
    finally:
        for a in actors:
            try:
                ray.get(a.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - a lost worker leaves nothing to close
                pass
            ray.kill(a)
    return workers, dict(zip(todo, done)), moved, devices
