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


def run_pipeline(cfg: PipelineConfig, output: str, from_stage: str | None = None) -> dict:
    """Runs every unfinished stage; `from_stage` forces that stage and the later ones to rerun.
    Returns {"report": ..., "manifest": ..., "seconds": {stage: s}}."""
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from-stage must be one of {', '.join(STAGES)}")
    plan = ingest.preflight(cfg)  # metadata checks before Ray starts or anything is written
    log.info("corpus: %d vectors, d=%d, %d shards", plan["n"], plan["d"], len(plan["shards"]))
    if not cfg.data.eval_queries:
        log.warning("no data.eval_queries: the index is built but not evaluated")
    init_ray(cfg)
    run = Run(output, cfg)
    storage.write_json(run.path("config.json"), {"config": cfg.to_dict(), "hash": cfg.hash()})
    steps = {
        "ingest": lambda: ingest.run(run, plan),
        "init": lambda: init.run(run),
        "teacher": lambda: teacher.run(run),
        "train": lambda: train.run(run),
        "export": lambda: build.run_export(run),
        "encode": lambda: build.run_encode(run),
        "merge": lambda: build.run_merge(run),
        "evaluate": lambda: evaluate.run(run),
    }
    forced = STAGES[STAGES.index(from_stage):] if from_stage else []
    seconds = {}
    for name in STAGES:
        if name == "evaluate" and not cfg.data.eval_queries:
            continue
        if run.is_done(name) and name not in forced:
            log.info("stage %s: already finished, skipping", name)
            seconds[name] = storage.read_json(run.manifest_uri(name))["seconds"]
            continue
        log.info("stage %s: starting", name)
        t0 = time.time()
        info = steps[name]()
        seconds[name] = round(time.time() - t0, 2)
        run.finish(name, info, seconds[name])
        log.info("stage %s: finished in %.1fs", name, seconds[name])
    rows = run.stage_info("evaluate")["rows"] if cfg.data.eval_queries else []
    sha = evaluate.write_report(run, rows, seconds) if rows else None
    manifest = build.publish_manifest(run, sha, seconds)
    return {"rows": rows, "manifest": manifest, "seconds": seconds}
