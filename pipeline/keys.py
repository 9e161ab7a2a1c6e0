"""Stage keys: what each stage's result depends on, so that a rerun redoes exactly the stages
whose inputs changed.

A stage's key hashes the config fields it reads (and, for the stages that read input files,
those files' identity: size and ETag or mtime) together with the keys its upstream stages
finished with. A stage is up to date when its recorded key equals the key computed now;
otherwise it runs, and the new key it records changes the keys of every stage below it.

Fields that change how a stage runs but not what it produces (worker counts, GPUs, the merge's
range count, whose output is byte-identical) are left out.
"""
from __future__ import annotations

import hashlib
import json

from pipeline.config import PipelineConfig

# Every train field but the scaling and fault-tolerance ones: Ray Train on W workers takes
# exactly the steps one worker takes (tests/test_stages.py checks it), and a restarted worker
# resumes from the last checkpoint.
_TRAIN_SCALING = {"num_workers", "use_gpu", "max_failures"}

FIELDS: dict[str, list[str]] = {
    "ingest": ["data.corpus", "data.train_queries", "data.rows_per_shard",
               "data.max_train_queries", "data.pseudo_queries", "init.train_sample",
               "init.seed", "inputs.corpus", "inputs.train_queries"],
    "init": ["index.nlist", "index.M", "index.nbits", "index.opq", "index.metric",
             "index.quantizer", "index.rq_beam", "init.niter", "init.opq_niter", "init.seed"],
    "teacher": ["teacher.k", "teacher.band_depth", "teacher.band_size", "teacher.query_block",
                "index.metric", "train.val_fraction", "train.seed"],
    "train": [f"train.{k}" for k in PipelineConfig().to_dict()["train"]
              if k not in _TRAIN_SCALING],
    "export": ["index.metric"],
    "encode": [],
    "merge": ["build.fastscan"],
    "evaluate": ["data.eval_queries", "data.labels", "data.max_eval_queries", "eval.nprobe",
                 "eval.k", "inputs.eval_queries", "inputs.labels"],
}

# A stage's record format, bumped when what it records changes shape, so that a record an
# older version wrote runs again instead of being misread downstream. ingest 2: it records the
# training query files, which tasks read, instead of the queries themselves. teacher 2:
# pseudo-queries' lists no longer hold the query's own row. ingest 3: it records the corpus's
# largest coordinate (the teacher's vector dtype follows it).
FORMATS: dict[str, int] = {"ingest": 3, "teacher": 2}

DEPS: dict[str, list[str]] = {
    "ingest": [], "init": ["ingest"], "teacher": ["ingest"], "train": ["init", "teacher"],
    "export": ["train"], "encode": ["ingest", "init", "export"], "merge": ["encode"],
    "evaluate": ["merge"],
}


def fields(cfg: PipelineConfig, stage: str, inputs: dict) -> dict:
    """{dotted name: value} of what `stage` reads. `inputs` maps an input name (corpus,
    train_queries, ...) to a digest of its files' identities (see input_digest)."""
    conf = cfg.to_dict()
    out = {}
    for name in FIELDS[stage]:
        section, key = name.split(".", 1)
        out[name] = inputs.get(key, "") if section == "inputs" else conf[section][key]
    if stage in FORMATS:
        out["stage format"] = FORMATS[stage]
    return json.loads(json.dumps(out))  # as a record reads back: tuples become lists


def stage_key(own: dict, deps: dict) -> str:
    """The key of a stage from its fields and its upstream stages' keys {stage: key}."""
    raw = json.dumps({"fields": own, "deps": deps}, sort_keys=True, default=list)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def input_digest(fingerprints: list[tuple[str, str]]) -> str:
    """One digest of a set of input files [(uri, fingerprint)]: a file added, removed or
    rewritten changes it."""
    return hashlib.sha256(json.dumps(sorted(fingerprints)).encode()).hexdigest()[:16]


def why_rerun(record: dict | None, own: dict, deps: dict) -> str:
    """Why a stage with this record must run: the fields and upstream stages that changed."""
    if record is None or "fields" not in record:
        return "not run before"
    changed = sorted(k for k in own.keys() | record["fields"].keys()
                     if own.get(k) != record["fields"].get(k))
    changed += [f"upstream {d}" for d in sorted(deps) if deps[d] != record["deps"].get(d)]
    return ", ".join(changed) or "key changed"


def stage_keys(cfg: PipelineConfig, inputs: dict) -> dict[str, tuple[str, dict, dict]]:
    """{stage: (key, its fields, its upstream keys)} for every stage, in run order."""
    out: dict[str, tuple[str, dict, dict]] = {}
    for stage in FIELDS:  # FIELDS lists the stages in run order
        own = fields(cfg, stage, inputs)
        deps = {d: out[d][0] for d in DEPS[stage]}
        out[stage] = (stage_key(own, deps), own, deps)
    return out
