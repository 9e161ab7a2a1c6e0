"""Runs the stages in order over one run folder, skipping those already finished."""
from __future__ import annotations

import logging
import os
import time

import ray

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.stages import build, evaluate, ingest, init, teacher, train
from pipeline.stages.common import Run

log = logging.getLogger("pipeline.runner")

STAGES = ["ingest", "init", "teacher", "train", "export", "encode", "merge", "evaluate"]


def init_ray(cfg: PipelineConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Train's controller needs a CPU slot beside the workers: on a 2-core machine a cluster
    # of exactly 2 CPUs with 2 training workers hangs waiting for it.
    cores = os.cpu_count() or 1
    num_cpus = cfg.ray.num_cpus or max(4, cores, cfg.train.num_workers + 2)
    # address="local": always a fresh cluster, never a stray `ray start` head found on disk.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


INCREMENTAL = ["ingest", "encode", "merge", "evaluate"]


def run_pipeline(cfg: PipelineConfig, output: str, from_stage: str | None = None,
                 incremental: bool = False, on_stage=None) -> dict:
    """Runs every unfinished stage; `from_stage` forces that stage and the later ones to rerun.
    `incremental` keeps the trained quantizers and re-encodes only new or changed shards.
    `on_stage(name)` is called as each stage starts (benchmarks attribute resources by it).
    Returns {"report": ..., "manifest": ..., "seconds": {stage: s}}."""
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}")
    if incremental and from_stage:
        raise ValueError("--incremental and --from-stage do not go together; choose one")
    plan = ingest.preflight(cfg)  # metadata checks before Ray starts or anything is written
    log.info("corpus: %d vectors, d=%d, %d shards", plan["n"], plan["d"], len(plan["shards"]))
    if not cfg.data.eval_queries:
        log.warning("no data.eval_queries: the index is built but not evaluated")
    init_ray(cfg)
    run = Run(output, cfg)
    if incremental and not run.is_done("export"):
        raise ValueError(f"--incremental needs a finished run under {output} with this config "
                         "(its quantizers are reused): run once without --incremental first")
    storage.write_json(run.path("config.json"), {"config": cfg.to_dict(), "hash": cfg.hash()})
    steps = {
        "ingest": (lambda: ingest.run_incremental(run, plan)) if incremental else
                  (lambda: ingest.run(run, plan)),
        "init": lambda: init.run(run),
        "teacher": lambda: teacher.run(run),
        "train": lambda: train.run(run),
        "export": lambda: build.run_export(run),
        "encode": lambda: build.run_encode(run),
        "merge": lambda: build.run_merge(run),
        "evaluate": lambda: evaluate.run(run),
    }
    if run.is_done("ingest") and not incremental and from_stage is None:
        before = {s["uri"]: s.get("fingerprint") for s in run.stage_info("ingest")["shards"]}
        now = {s["uri"]: s.get("fingerprint") for s in plan["shards"]}
        if before != now:
            log.warning("the corpus files changed since this run's ingest; finished stages "
                        "still describe the old files. Rebuild with --incremental (frozen "
                        "quantizers) or --from-stage ingest (retrain)")
    forced = STAGES[STAGES.index(from_stage):] if from_stage else []
    if incremental:
        forced = INCREMENTAL
    seconds = {}
    for name in STAGES:
        if name == "evaluate" and not cfg.data.eval_queries:
            continue
        if run.is_done(name) and name not in forced:
            log.info("stage %s: already finished, skipping", name)
            seconds[name] = storage.read_json(run.manifest_uri(name))["seconds"]
            continue
        log.info("stage %s: starting", name)
        if on_stage is not None:
            on_stage(name)
        t0 = time.time()
        info = steps[name]()
        seconds[name] = round(time.time() - t0, 2)
        run.finish(name, info, seconds[name])
        log.info("stage %s: finished in %.1fs", name, seconds[name])
    rows = run.stage_info("evaluate")["rows"] if cfg.data.eval_queries else []
    report_files = evaluate.write_report(run, rows, seconds) if rows else {}
    manifest = build.publish_manifest(run, report_files, seconds)
    return {"rows": rows, "manifest": manifest, "seconds": seconds}
