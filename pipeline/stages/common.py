"""What every Ray stage shares: the run folder, stage manifests, thread pinning, progress."""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import ray

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.data import readers

log = logging.getLogger("pipeline.stages")

RECORD = "_manifest.json"  # a stage's record, written last: the stage is finished

# method name -> (its trained index in the run folder, its folder in a published version)
METHODS = {
    "faiss-ivfpq": (("init", "baseline.index"), "baseline"),
    "distilled-ivfpq": (("export", "trained.index"), "index"),
}


def method_names(cfg: PipelineConfig) -> dict:
    """Report names by structure: faiss-ivf-opq / distilled-ivf-opq when a rotation is
    learned, -ivf-rq for the residual quantizer, -ivf-pq otherwise."""
    suffix = "ivf-rq" if cfg.index.quantizer == "rq" else \
        "ivf-opq" if cfg.index.opq else "ivf-pq"
    return {"faiss-ivfpq": f"faiss-{suffix}", "distilled-ivfpq": f"distilled-{suffix}"}


@dataclass
class Run:
    """The run folder (local path or s3:// prefix) and the resolved config. The runner fills
    `keys` (each stage's key in this run, see pipeline.keys) and `forced` (stages that run
    afresh whatever they left behind: --from-stage).

    `lease` is the token of the output's lease this job holds, and `sealed` the sha256 of each
    stage record as it stood when the job took the lease (Run.sealing). A record is trusted
    only if this job wrote it, or it is byte for byte one of those: a record that a job which
    lost the lease wrote late (a request delayed in the network) is ignored, never read."""
    output: str
    cfg: PipelineConfig
    keys: dict = field(default_factory=dict)
    forced: set = field(default_factory=set)
    lease: str = ""
    sealed: dict | None = None  # None: no lease checks (tests and benchmarks)

    @classmethod
    def sealing(cls, output: str, cfg: PipelineConfig, lease: str) -> Run:
        """The run of a job that holds the lease `lease`, with the records found now sealed."""
        sealed = {}
        for stage in storage.listdir(storage.join(output, "stages")):
            uri = storage.join(output, "stages", stage, RECORD)
            if storage.exists(uri):
                sealed[stage] = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
        return cls(output, cfg, lease=lease, sealed=sealed)

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def stage_path(self, stage: str, *parts: str) -> str:
        return self.path("stages", stage, *parts)

    def manifest_uri(self, stage: str) -> str:
        return self.stage_path(stage, RECORD)

    def record(self, stage: str) -> dict | None:
        """The stage's manifest ({"key", "fields", "deps", "seconds", "info", "lease"}), or
        None when it never finished here (or its record is not trusted, see the class)."""
        uri = self.manifest_uri(stage)
        if not storage.exists(uri):
            return None
        raw = storage.read_bytes(uri)
        record = json.loads(raw)
        if self.sealed is not None and record.get("lease") != self.lease and \
                self.sealed.get(stage) != hashlib.sha256(raw).hexdigest():
            log.warning("stage %s: its record was written by another job's lease (%s) after "
                        "this job took the output; it is ignored", stage, record.get("lease"))
            return None
        return record

    def resume_key(self, stage: str) -> str:
        """The key under which a stage may keep work a killed run left behind: its stage key,
        or "" (keep nothing) when --from-stage forces it to run afresh."""
        return "" if stage in self.forced else self.keys.get(stage, "")

    def stage_info(self, stage: str) -> dict:
        record = self.record(stage)
        if record is None:
            raise RuntimeError(f"stage {stage} has no trusted record under {self.output}: "
                               "another job wrote into this output; rerun")
        return record["info"]

    def finish(self, stage: str, info: dict, seconds: float, key: str = "",
               fields: dict | None = None, deps: dict | None = None, held=None) -> None:
        """Commits a stage: its record, written last (a stage without one is unfinished and
        runs again). With `held` (the output's lease) the record is written under it and
        names the lease that wrote it."""
        record = storage.json_bytes({
            "stage": stage, "key": key, "fields": fields or {}, "deps": deps or {},
            "seconds": seconds, "info": info, "lease": held.token if held else ""})
        if held is None:
            storage.write_bytes(self.manifest_uri(stage), record)
        else:
            held.write(self.manifest_uri(stage), record)


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


def pin_threads() -> int:
    """Limits faiss/torch/BLAS threads to the CPUs Ray gave this task (OpenMP threads spin
    badly when cores are oversubscribed), and trims the heap an earlier task of this worker
    left (trim_heap). Returns the thread count. Every task calls it first."""
    import faiss
    import torch

    trim_heap()

    try:
        n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    except Exception:  # noqa: BLE001 - outside a Ray worker (driver, tests): use every core
        n = os.cpu_count() or 1
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    return n


class Group(str, Enum):
    """The node group a task runs in (ray.gpu_group / ray.cpu_group name their resources)."""
    GPU = "gpu"  # teacher, training
    CPU = "cpu"  # ingest, init, encode, merge, evaluate


# What one task asks of its group's custom resource: enough to be placed only on the group's
# nodes, too little to limit how many run there (the CPUs do that).
GROUP_SHARE = 0.001


def group_resource(cfg: PipelineConfig, group: Group) -> str:
    return cfg.ray.gpu_group if group is Group.GPU else cfg.ray.cpu_group


def placement(cfg: PipelineConfig, group: Group) -> dict:
    """The custom resources a task of `group` asks for ({} when no group is configured)."""
    name = group_resource(cfg, group)
    return {name: GROUP_SHARE} if name else {}


def group_nodes(cfg: PipelineConfig, group: Group) -> list[dict]:
    """The alive nodes a task of `group` may land on."""
    name = group_resource(cfg, group)
    return [n for n in ray.nodes() if n.get("Alive") and (not name or name in n["Resources"])]


def check_groups(cfg: PipelineConfig) -> None:
    """Fails at once, naming the setting, when a configured group has no node with CPUs (its
    tasks would wait forever)."""
    for group in Group:
        name = group_resource(cfg, group)
        if name and not any(n["Resources"].get("CPU", 0) > 0 for n in group_nodes(cfg, group)):
            offered = sorted({r for n in ray.nodes() if n.get("Alive") for r in n["Resources"]
                              if r not in ("CPU", "GPU", "memory", "object_store_memory")
                              and not r.startswith("node:")})
            raise ValueError(f"ray.{group.value}_group: no alive node with CPUs offers the "
                             f"resource {name!r} (custom resources offered: "
                             f"{', '.join(offered) or 'none'}). Give the nodes it in their "
                             "`resources` (infra/cluster-aws.yaml), or leave it empty.")


def largest_node_cpus(cfg: PipelineConfig, group: Group) -> int:
    """The most CPUs one alive node of `group` offers. A task asking for more (the cluster's
    total, on several nodes) could never be placed, and the job would wait forever."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in group_nodes(cfg, group)]
    return max(cpus + [1])


def check_unique_ids(cfg: PipelineConfig, spans: list, blocks: list[dict], what: str) -> None:
    """Raises a ValueError naming `what` when two blocks (Shard dicts, with their (id_min,
    id_max) in `spans`) share an id. Only blocks whose id ranges overlap are read again, by
    tasks: the driver never holds a whole id set."""
    order = sorted((lo, hi, i) for i, (lo, hi) in enumerate(spans))
    overlapping = {i for a, b in zip(order, order[1:]) if b[0] <= a[1] for i in (a[2], b[2])}
    if not overlapping:
        return
    read_ids = ray.remote(lambda sh: readers.read_rows(sh["uri"], sh["start"], sh["stop"],
                                                       sh["id_offset"])[0])
    read_ids = read_ids.options(resources=placement(cfg, Group.CPU))
    ids = np.concatenate(ray.get([read_ids.remote(blocks[i]) for i in sorted(overlapping)]))
    u, c = np.unique(ids, return_counts=True)
    if (c > 1).any():
        raise ValueError(f"{what}: duplicate ids across files {u[c > 1][:5].tolist()}; "
                         "ids must be unique")


def wait_all(refs: list, what: str, every: float = 10.0) -> list:
    """ray.get with a progress line (done/total, elapsed, ETA) at most every `every` seconds.
    Results come back in the order of `refs`."""
    t0 = last = time.time()
    pending = list(refs)
    total = len(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every)
        now = time.time()
        done = total - len(pending)
        if pending and now - last >= every or not pending:
            eta = f"{(now - t0) / done * len(pending):.0f}s" if done else "not yet known"
            log.info("%s: %d/%d done, %.0fs elapsed, ETA %s", what, done, total, now - t0, eta)
            last = now
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        # A task that met bad input raises the ValueError the user should read, without the
        # remote traceback around it.
        if isinstance(e.cause, ValueError):
            raise ValueError(str(e.cause.args[0]) if e.cause.args else str(e.cause)) from None
        raise


def fault_point(name: str) -> None:
    """Fault injection for the fault tests, a no-op otherwise.

    PIPELINE_FAULT_KILL="name:DIR": the first process to reach this point SIGKILLs itself (as
    the OOM killer would), leaving DIR/name as the evidence. PIPELINE_FAULT_HOLD="name:DIR"
    (set on one node of a test cluster): every process that reaches it writes
    DIR/name-<pid> and waits there, until the test takes its node away."""
    hold = os.environ.get("PIPELINE_FAULT_HOLD", "")
    if hold.startswith(name + ":"):
        open(os.path.join(hold.split(":", 1)[1], f"{name}-{os.getpid()}"), "w").close()
        while True:
            time.sleep(1)
    spec = os.environ.get("PIPELINE_FAULT_KILL", "")
    if not spec.startswith(name + ":"):
        return
    flag = os.path.join(spec.split(":", 1)[1], name)
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return  # killed once already: the retry goes through
    os.kill(os.getpid(), signal.SIGKILL)
