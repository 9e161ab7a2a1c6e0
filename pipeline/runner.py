"""Runs the stages over one run folder, each only when what it reads changed, then publishes
the result as a new version.

A stage is skipped when its recorded key (pipeline.keys) equals the key it would run with now;
otherwise it runs, and so does every stage below it. The whole job holds the output's lease
(pipeline.lease), so no two jobs write one output at once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager

import ray

from pipeline import keys, lease, provenance, publish, report, storage
from pipeline.config import PipelineConfig, validate_for_pipeline
from pipeline.data import readers
from pipeline.data.plan import Shard
from pipeline.distributed.autoscale import ensure_groups
from pipeline.distributed.tasks import trim_heap
from pipeline.errors import InputError
from pipeline.index import build, sizing
from pipeline.stages import encode, evaluate, ingest, init, teacher, train
from pipeline.workflow.results import Plan
from pipeline.workflow.stage import METHODS, Context, Run, Stage, StageConfig

log = logging.getLogger("ivf_distill.runner")

# The declared graph, each stage after the stages it needs.
GRAPH: list[Stage] = [ingest.STAGE, init.STAGE, teacher.STAGE, train.STAGE, encode.EXPORT,
                      encode.ENCODE, encode.MERGE, evaluate.STAGE]
BY_NAME = {s.name: s for s in GRAPH}
STAGES = [s.name for s in GRAPH]
# The stages whose results an incremental rebuild keeps: the trained quantizers.
FROZEN = ["init", "teacher", "train", "export"]
# What an incremental rebuild is for: the corpus's files and how they are cut into shards
# may change under the kept quantizers; any other setting of theirs may not.
CORPUS = {"inputs.data.corpus", "data.corpus", "data.rows_per_shard", "data.verify"}


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the job; `stage` is the stage it stopped (None: before or
    after the stages). A BaseException, like KeyboardInterrupt, so no handler swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.stage = signum, None


@contextmanager
def _interruptible():
    """SIGINT and SIGTERM raise Interrupted in the main thread while the job runs. Yields a
    function that arms the handlers again: ray.init installs its own SIGTERM handler, which
    aborts the process with a core dump."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    def arm() -> dict:
        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            return {}

    saved = arm()
    try:
        yield arm
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _call_interruptibly(fn, held: lease.Lease | None = None):
    """fn() in a helper thread while the main thread waits: signal handlers run only in the
    main thread, and there they must not interrupt Ray's own calls halfway (an exception
    raised inside ray.get leaves the job in a broken state). On Interrupted the helper is
    abandoned; the process is about to exit, which ends a local Ray cluster with it. So it
    is when the lease `held` is lost meanwhile (LeaseLost): the job stops writing at once."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="stage", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if held is not None:
            held.check()
    if "error" in box:
        raise box["error"]
    return box["value"]


def init_ray(cfg: PipelineConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # The watchers of pipeline.events (and their settings) must reach the job's workers on
        # whichever node they run: a worker's environment is its node's.
        watch = {k: v for k, v in os.environ.items() if k.startswith("IVF_DISTILL_")}
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": watch} if watch else None)
        return
    # Ray Train's controller needs a CPU slot beside the workers: on a 2-core machine a cluster
    # of exactly 2 CPUs with 2 training workers hangs waiting for it.
    cores = os.cpu_count() or 1
    num_cpus = cfg.ray.num_cpus or max(4, cores, cfg.ray.train_workers + 2)
    # address="local": always a fresh cluster, never a stray `ray start` head found on disk.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def check_output(cfg: PipelineConfig, output: str) -> None:
    """The output and inputs are usable, before the lease or any work: URIs well formed, S3
    buckets reachable with these credentials (within seconds, not after minutes of retries),
    and an S3 output's store enforces the conditional writes that the lease relies on."""
    storage.check_uri(output, "--output", folder=True)
    inputs = {"data.corpus": cfg.data.corpus, "data.train_queries": cfg.data.train_queries,
              "eval.queries": cfg.eval.queries, "eval.labels": cfg.eval.labels}
    for what, uri in inputs.items():
        if uri:
            storage.check_uri(uri, what)
    for what, uri in {"--output": output, **inputs}.items():
        if uri:
            storage.check_reachable(uri, what)
    if storage.is_file(output):
        raise InputError(f"--output {output} is a file; give a folder or an s3:// prefix "
                         "(it is created if missing)")
    try:
        storage.check_conditional_writes(output)
    except RuntimeError as e:
        if cfg.publish.require_conditional_writes:
            raise InputError(f"--output: {e}") from None
        log.warning("%s. Going on (publish.require_conditional_writes=false): two jobs on this "
                    "output are NOT kept apart", str(e).split(". Use a store")[0])


def run_pipeline(cfg: PipelineConfig, output: str, from_stage: str | None = None,
                 incremental: bool = False, on_stage=None, break_lease: bool = False) -> dict:
    """Runs every stage whose key changed, then publishes a new version if anything did.
    `from_stage` forces that stage and the later ones to run afresh. `incremental` keeps the
    trained quantizers and re-encodes only new or changed shards. `on_stage(name)` is called
    as each stage starts (benchmarks attribute resources by it).
    Returns {"rows": ..., "manifest": ..., "seconds": {stage: s}}."""
    if from_stage is not None and from_stage not in STAGES:
        raise InputError(f"--from-stage must be one of {', '.join(STAGES)}")
    if incremental and from_stage:
        raise InputError("--incremental and --from-stage do not go together; choose one")
    validate_for_pipeline(cfg)
    check_output(cfg, output)
    with _interruptible() as arm, \
            lease.hold(output, cfg.publish.lease_seconds, break_lease) as held:
        plan = ingest.preflight(cfg)  # metadata checks before Ray starts or anything is written
        cfg = cfg.with_values(plan.resolved) if plan.resolved else cfg  # the auto sizes
        log.info("corpus: %d vectors, d=%d, %d shards", plan.n, plan.d, len(plan.shards))
        if not cfg.eval.queries:
            log.warning("no eval.queries: the index is built but not evaluated")
        run = Run.sealing(output, held.token)
        if incremental:
            _check_incremental(cfg, run, plan)
        init_ray(cfg)
        ensure_groups(cfg.ray)
        arm()
        planned = keys.stage_keys(cfg, GRAPH, plan.inputs)
        seconds, ran = _run_stages(cfg, run, plan, planned, from_stage, incremental, on_stage,
                                   held)
        rows = run.result(evaluate.STAGE).rows if cfg.eval.queries else []
        built_from = {s: planned[s][0] for s in ("merge", "evaluate")}
        manifest = _publish(cfg, run, rows, seconds, held, built_from, fresh=bool(ran))
    return {"rows": rows, "manifest": manifest, "seconds": seconds}


def dry_run(cfg: PipelineConfig, output: str) -> list[str]:
    """What run_pipeline would build under `output` and what it would cost, from the inputs'
    metadata alone: no Ray, no lease, nothing written."""
    validate_for_pipeline(cfg)
    plan = ingest.preflight(cfg)
    notes = sizing.resolve(cfg.index, plan.n, plan.d, cfg.data.train_sample)[1]
    cfg = cfg.with_values(plan.resolved) if plan.resolved else cfg
    train_q = sum(f[1] for f in plan.train_query_files)
    if cfg.data.max_train_queries:
        train_q = min(train_q, cfg.data.max_train_queries)
    eval_q = sum(f[1] for f in readers.query_files("eval.queries", cfg.eval.queries, plan.d,
                                                   columns=cfg.data.columns)) \
        if cfg.eval.queries else 0
    if cfg.eval.max_queries:
        eval_q = min(eval_q, cfg.eval.max_queries)
    cores = cfg.ray.num_cpus or os.cpu_count() or 1
    current = publish.read_pointer(output)[0] if storage.exists(output) else None
    now = f"current version {current['version']}" if current else "nothing published yet"
    return [f"output: {output} ({now}; the dry run writes nothing)",
            *notes, *sizing.plan_lines(cfg, plan.n, plan.d, len(plan.shards), train_q, eval_q,
                                       cores)]


def _check_incremental(cfg: PipelineConfig, run: Run, plan: Plan) -> None:
    """An incremental rebuild keeps the quantizers: they must exist and have been trained
    with the settings given now."""
    for name in FROZEN:
        record = run.record(name)
        if record is None:
            raise InputError(f"--incremental needs a finished run under {run.output} (its "
                             "quantizers are reused): run once without --incremental first")
        stage = BY_NAME[name]
        own = keys.fields(cfg, stage.sections, plan.inputs, stage.format)
        changed = [k for k in own if own[k] != record["fields"].get(k) and k not in CORPUS]
        if changed:
            raise InputError(f"--incremental keeps the trained quantizers, but "
                             f"{', '.join(changed)} changed since they were trained; rerun "
                             "without --incremental to retrain")


def stage_context(cfg: PipelineConfig, run: Run, stage: Stage, key: str = "",
                  fresh: bool = False, extra: dict | None = None) -> Context:
    """What `stage` runs with: its sections of the config, its upstream stages' results as
    recorded in `run` (and `extra` inputs), its key, and whether it runs afresh."""
    inputs = {name: run.result(BY_NAME[name]) for name in stage.needs}
    return Context(stage.name, StageConfig.of(stage.name, cfg, stage.sections),
                   {**inputs, **(extra or {})}, run, key, fresh)


def _run_stages(cfg: PipelineConfig, run: Run, plan: Plan, planned: dict, from_stage,
                incremental: bool, on_stage, held: lease.Lease) -> tuple[dict, list]:
    """Walks the graph, running the stages that need it; returns ({stage: seconds}, [stages
    that ran])."""
    forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    seconds, ran = {}, []
    for stage in GRAPH:
        name = stage.name
        if name == "evaluate" and not cfg.eval.queries:
            continue
        held.check()
        key, own, deps = planned[name]
        record = run.record(name)
        if incremental and name in FROZEN:
            if record["key"] != key:  # the kept quantizers now stand for the new corpus
                run.finish(name, run.result(stage), record["seconds"], key, own, deps, held)
            log.info("stage %s: kept (--incremental: the quantizers are frozen)", name)
            seconds[name] = record["seconds"]
            continue
        if name in forced:
            why = f"--from-stage {from_stage}"
        elif record is not None and record.get("key") == key:
            log.info("stage %s: skipped (unchanged)", name)
            seconds[name] = record["seconds"]
            continue
        else:
            why = keys.why_rerun(record, own, deps)
        log.info("stage %s: runs: %s", name, why)
        if on_stage is not None:
            on_stage(name)
        extra = {"preflight": plan} if name == "ingest" else {}
        step = stage.run
        if name == "ingest" and incremental:
            extra["previous"] = run.result(stage)
            step = ingest.run_incremental
        ctx = stage_context(cfg, run, stage, key, name in forced, extra)
        t0 = time.time()
        try:
            result = _call_interruptibly(lambda: step(ctx), held)
        except Interrupted as e:
            e.stage = name
            raise
        seconds[name] = round(time.time() - t0, 2)
        run.finish(name, result, seconds[name], key, own, deps, held)
        trim_heap()  # the driver starts each stage without the last one's freed peak
        ran.append(name)
        log.info("stage %s: finished in %.1fs", name, seconds[name])
    return seconds, ran


def _publish(cfg: PipelineConfig, run: Run, rows: list[dict], seconds: dict,
             held: lease.Lease, built_from: dict, fresh: bool) -> dict:
    """Publishes the merged indexes, the report and the config as a new version. With
    fresh=False (every stage skipped) nothing is published if the current version was built
    from these very stage keys (`built_from`)."""
    merged = run.result(encode.MERGE)
    ingested = run.result(ingest.STAGE)
    n = ingested.n
    extra = {"config.json": storage.json_bytes({"config": cfg.to_dict(), "hash": cfg.hash()})}
    if ingested.string_ids:
        extra[publish.ID_MAP] = readers.id_map_bytes([Shard(**s) for s in ingested.shards])
    if rows:
        train_info = dataclasses.asdict(run.result(train.STAGE))
        summary = {"index": "index/index.index" if merged.parts == 1
                   else f"index/index.*.index ({merged.parts} parts)", "vectors": n,
                   "bytes_per_vector": build.bytes_per_vector(cfg.index),
                   "config_hash": cfg.hash()}
        extra.update(report.report_files(rows, train_info, seconds, summary,
                                         _devices(run)))
    meta = {
        "counts": {"vectors": n, "shards": len(ingested.shards), "d": ingested.d},
        "parameters": {**cfg.to_dict()["index"],
                       "bytes_per_vector": build.bytes_per_vector(cfg.index)},
        "config_hash": cfg.hash(),
        "stage_seconds": seconds,
        "devices": _devices(run),
        "software": provenance.software(),
        "open_with": "pipeline.open_index(output), or faiss.read_index(path) for a local "
                     "single-part output, or faiss.read_index(path, "
                     "faiss.IO_FLAG_ONDISK_SAME_DIR) after copying a part's .index and "
                     ".ivfdata into one folder; one part per server works too",
    }
    indexes = {METHODS[m][1]: (i.uri, i.files, i.parts, i.fastscan)
               for m, i in merged.indexes.items()}
    return publish.publish(run.output, indexes, extra, meta, built_from, held,
                           cfg.publish.keep_versions, cfg.publish.grace_seconds, fresh)


def _devices(run: Run) -> dict:
    """{stage: the device and library it ran on}, for the stages that record one."""
    out = {}
    for stage in STAGES:
        result = run.result(BY_NAME[stage]) if run.record(stage) else None
        if getattr(result, "device", ""):
            out[stage] = result.device
    return out


def rollback(output: str, version: str, lease_seconds: float, break_lease: bool) -> dict:
    """Points the output's manifest back at an earlier version, under the output's lease."""
    storage.check_uri(output, "--output", folder=True)
    storage.check_reachable(output, "--output")
    with lease.hold(output, lease_seconds, break_lease) as held:
        return publish.rollback(output, version, held)
