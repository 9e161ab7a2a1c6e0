"""What every task and the driver share: thread pinning and heap trimming, waiting with
progress lines, and the cross-file id check."""
from __future__ import annotations

import ctypes
import logging
import os
import time

import numpy as np
import ray

from pipeline import events
from pipeline.config import RayConfig
from pipeline.data import readers
from pipeline.data.plan import Shard
from pipeline.distributed.placement import Group, placement
from pipeline.errors import InputError

log = logging.getLogger("ivf_distill.distributed")


def trim_heap() -> None:
    """Hands the heap that freed arrays left behind back to the OS (glibc malloc_trim;
    Arrow's pool likewise). glibc keeps freed blocks below its mmap threshold, and that
    threshold rises with every large array freed, so without this a long-lived process keeps
    the peak of whatever it did before: the driver after ingest's copies of the training
    sample, a reused Ray worker after its previous task (docs/scale.md has the figures)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def keep_freed_memory() -> bool:
    """Has glibc's allocator keep freed memory in the process for the next allocation.

    A training step's largest temporaries (the (M, n, 256) codeword scores: 129 MB at 16 B) are
    above glibc's mmap threshold (at most 32 MB by default), so each one is mapped afresh and
    page-faulted in on first touch, then unmapped again: on CPUs that costs more than the
    arithmetic on them. Served from the heap, and never trimmed below 2 GB, they reuse memory
    already mapped. The process keeps up to that much freed memory: fine for a training worker,
    which holds its peak anyway. The setting governs the main thread's arena; a process whose
    training runs in another thread (a Ray Train worker) also needs MALLOC_ARENA_MAX=1 in its
    environment (the train stage sets it). Returns whether the allocator took it (False off
    glibc).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2 << 30))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pin_threads(threads: int | None = None) -> int:
    """Limits faiss/torch/BLAS threads to the CPUs Ray gave this task (OpenMP threads spin
    badly when cores are oversubscribed), and trims the heap an earlier task of this worker
    left (trim_heap). Returns the thread count. Every task calls it first. `threads`: this
    many instead, for a worker that knows the CPUs it may use beyond what it holds."""
    import faiss
    import torch

    trim_heap()

    try:
        context = ray.get_runtime_context()
        assigned, task = context.get_assigned_resources(), context.get_task_name()
    except Exception:  # noqa: BLE001 - outside a Ray worker (driver, tests): use every core
        assigned, task = {"CPU": os.cpu_count() or 1}, None
    if task:
        events.emit("task", task=task, resources=assigned)  # what Ray gave this task
    n = int(assigned.get("CPU", 1)) or 1
    # Never more threads than cores this process may run on: a local cluster declares at
    # least 4 CPUs (Train's controller needs a slot), and on 2 cores 4 spinning OpenMP
    # threads run k-means and the exact search several times slower than 2.
    n = min(threads or n, _cores())
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    return n


def check_unique_ids(cfg: RayConfig, spans: list, blocks: list[dict], what: str) -> None:
    """Raises a ValueError naming `what` when two blocks (Shard dicts, with their (id_min,
    id_max) in `spans`) share an id. Only blocks whose id ranges overlap are read again, by
    tasks: the driver never holds a whole id set."""
    order = sorted((lo, hi, i) for i, (lo, hi) in enumerate(spans))
    overlapping = {i for a, b in zip(order, order[1:]) if b[0] <= a[1] for i in (a[2], b[2])}
    if not overlapping:
        return
    read_ids = ray.remote(lambda sh: readers.read_shard(Shard(**sh))[0])
    read_ids = read_ids.options(resources=placement(cfg, Group.CPU))
    ids = np.concatenate(ray.get([read_ids.remote(blocks[i]) for i in sorted(overlapping)]))
    u, c = np.unique(ids, return_counts=True)
    if (c > 1).any():
        raise InputError(f"{what}: duplicate ids across files {u[c > 1][:5].tolist()}; "
                         "ids must be unique")


def task_window() -> int:
    """Tasks a stage keeps submitted at once: twice the cluster's CPUs, enough to keep every
    core busy while finished ones are collected."""
    return 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))


def wait_all(refs: list, what: str, every: float = 10.0) -> list:
    """ray.get with a progress line (done/total, elapsed, ETA) at most every `every` seconds.
    Results come back in the order of `refs`."""
    return windowed([lambda r=r: r for r in refs], what, len(refs) or 1, every)


def windowed(submits: list, what: str, window: int, every: float = 10.0,
             peak: list | None = None) -> list:
    """Runs `submits` (callables, each submitting one task and returning its ref) with at
    most `window` refs held at a time: the driver's references stay bounded however many
    tasks a stage has. A progress line (done/total, elapsed, ETA) at most every `every`
    seconds. Results come back in the order of `submits`; `peak`, if given, receives the most
    refs held at once."""
    t0 = last = time.time()
    total, results, pending, most, done = len(submits), [None] * len(submits), {}, 0, 0
    upcoming = iter(enumerate(submits))
    while True:
        for i, submit in upcoming:
            pending[submit()] = i
            if len(pending) >= window:
                break
        most = max(most, len(pending))
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=every)
        for ref in ready:
            results[pending.pop(ref)] = _get(ref)
            done += 1
        now = time.time()
        if now - last >= every or done == total:
            eta = f"{(now - t0) / done * (total - done):.0f}s" if done else "not yet known"
            log.info("%s: %d/%d done, %.0fs elapsed, ETA %s", what, done, total, now - t0, eta)
            last = now
    if peak is not None:
        peak.append(most)
    return results


def _get(ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        # A task that met bad input raises the InputError the user should read, without the
        # remote traceback around it; anything else keeps its traceback.
        if isinstance(e.cause, InputError):
            raise InputError(str(e.cause.args[0]) if e.cause.args else str(e.cause)) from None
        raise
