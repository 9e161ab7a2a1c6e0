"""Stage keys: what each stage's result depends on, so that a rerun redoes exactly the stages
whose inputs changed.

A stage's key hashes every field of the config sections it is given (pipeline.workflow.stage.
Stage.sections: a stage cannot read any other, so no field it reads is left out), the
identity of the input files those sections name (size and ETag or mtime: `input_digest`), its
record format, and the keys its upstream stages finished with. A stage is up to date when its
recorded key equals the key computed now; otherwise it runs, and the new key it records
changes the keys of every stage below it.

Settings that change how a stage runs but not what it produces (worker counts, GPUs, the
merge's range count, whose output is byte-identical) live in the `ray` section, which no
stage is keyed on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json


def fields(cfg, sections: tuple[str, ...], inputs: dict, fmt: int) -> dict:
    """{dotted name: value} of every field of `sections`, with `inputs.<section.field>` for
    each input digest (`inputs` maps "section.field" to input_digest) whose section is
    among them, and the record format."""
    out = {}
    for section in sections:
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            out[f"{section}.{name}"] = value
    for name, digest in inputs.items():
        if name.split(".", 1)[0] in sections:
            out[f"inputs.{name}"] = digest
    out["stage format"] = fmt
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


def stage_keys(cfg, stages: list, inputs: dict) -> dict[str, tuple[str, dict, dict]]:
    """{stage: (key, its fields, its upstream keys)} for `stages` (pipeline.workflow.stage.
    Stage, each after the stages it needs), in their order."""
    out: dict[str, tuple[str, dict, dict]] = {}
    for stage in stages:
        own = fields(cfg, stage.sections, inputs, stage.format)
        deps = {d: out[d][0] for d in stage.needs}
        out[stage.name] = (stage_key(own, deps), own, deps)
    return out
