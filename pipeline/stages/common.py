"""What the stages share: the run folder, its stage records, and the methods a run builds."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.config import PipelineConfig

log = logging.getLogger("pipeline.stages")


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
