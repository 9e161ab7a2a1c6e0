"""What the stages share: what a stage is (`Stage`: its name, the config sections it is
given, the stages it reads, its result type), the config view that holds it to those sections
(`StageConfig`), what it runs with (`Context`), the run folder with its stage records (`Run`),
and the methods a run builds."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Callable

from pipeline import storage
from pipeline.config import Baseline, BuildConfig, IndexConfig, PipelineConfig
from pipeline.workflow import results

log = logging.getLogger("ivf_distill.stages")

# The sections every stage is given and no stage key covers: how the work is spread, which
# changes no result (pipeline.config.RayConfig).
UNKEYED = ("ray",)


class UndeclaredSection(LookupError):
    """A stage read a config section it does not declare: its key would not cover it."""


class StageConfig:
    """The config as one stage sees it: its declared sections and `ray`. Reading any other
    section raises UndeclaredSection, so a stage's key (which covers exactly its declared
    sections) cannot miss a setting that the stage reads."""
    __slots__ = ("_stage", "_sections")

    def __init__(self, stage: str, sections: dict):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_sections", dict(sections))

    @classmethod
    def of(cls, stage: str, cfg: PipelineConfig, names: tuple[str, ...]) -> StageConfig:
        return cls(stage, {n: getattr(cfg, n) for n in (*names, *UNKEYED)})

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._sections[name]
        except KeyError:
            raise UndeclaredSection(
                f"stage {self._stage} reads config section {name!r}, which it does not "
                f"declare (it is given {', '.join(self._sections)}): add {name!r} to its "
                "Stage(sections=...), so that its key covers it") from None

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"a stage's config is read-only ({name})")

    def __reduce__(self):  # travels to Ray Train's workers
        return StageConfig, (self._stage, self._sections)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the runner walks them.

    `sections`: the config sections it is given; its key covers exactly these, with the
    keys of the stages in `needs` and the identity of the input files its sections name.
    `needs`: the stages whose results (and folders) it reads. `run(ctx) -> result` does the
    work; `result` is its type. `format` is bumped when what it records changes shape, so
    that a record an older version wrote runs again instead of being misread downstream."""
    name: str
    sections: tuple[str, ...]
    needs: tuple[str, ...]
    result: type
    run: Callable
    format: int = 1


@dataclass(frozen=True)
class Context:
    """What one stage runs with: its config view, its upstream stages' results, and the run
    folder, of which it writes only its own stage's folder."""
    stage: str
    cfg: StageConfig
    inputs: dict  # {upstream stage: its result}
    run: Run
    key: str = ""  # this stage's key in this run (pipeline.keys)
    fresh: bool = False  # --from-stage: it runs afresh, keeping nothing a killed run left

    @property
    def resume_key(self) -> str:
        """The key under which the stage may keep work that a killed run left behind, or ""
        (keep nothing) when it runs afresh."""
        return "" if self.fresh else self.key

    def path(self, *parts: str) -> str:
        """A path in this stage's folder."""
        return self.run.stage_path(self.stage, *parts)

    def upstream(self, stage: str, *parts: str) -> str:
        """A path in the folder of a stage this one reads."""
        if stage not in self.inputs:
            raise LookupError(f"stage {self.stage} reads the folder of {stage}, which it does "
                              "not list in its Stage(needs=...)")
        return self.run.stage_path(stage, *parts)

RECORD = "_manifest.json"  # a stage's record, written last: the stage is finished

# method name -> (its trained index in the run folder, its folder in a published version)
METHODS = {
    "faiss-ivfpq": (("init", "baseline.index"), "baseline"),
    "distilled-ivfpq": (("export", "trained.index"), "index"),
}


def built_methods(build: BuildConfig) -> list[str]:
    """The methods whose index a run encodes and merges: the distilled one, and the faiss
    baseline with build.baseline=full."""
    return [m for m in METHODS if m == "distilled-ivfpq" or build.baseline == Baseline.FULL]


def method_names(index: IndexConfig) -> dict:
    """Report names by structure: faiss-ivf-opq / distilled-ivf-opq when a rotation is
    learned, -ivf-rq and -ivf-lsq for the additive quantizers, -ivf-pq otherwise."""
    suffix = f"ivf-{index.quantizer}" if index.quantizer != "pq" else \
        "ivf-opq" if index.opq else "ivf-pq"
    return {"faiss-ivfpq": f"faiss-{suffix}", "distilled-ivfpq": f"distilled-{suffix}"}


@dataclass(frozen=True)
class Run:
    """The run folder (local path or s3:// prefix) and its stage records.

    `lease` is the token of the output's lease this job holds, and `sealed` the sha256 of each
    stage record as it stood when the job took the lease (Run.sealing). A record is trusted
    only if this job wrote it, or it is byte for byte one of those: a record that a job which
    lost the lease wrote late (a request delayed in the network) is ignored, never read."""
    output: str
    lease: str = ""
    sealed: dict | None = None  # None: no lease checks (tests and benchmarks)

    @classmethod
    def sealing(cls, output: str, lease: str) -> Run:
        """The run of a job that holds the lease `lease`, with the records found now sealed."""
        sealed = {}
        for stage in storage.listdir(storage.join(output, "stages")):
            uri = storage.join(output, "stages", stage, RECORD)
            if storage.exists(uri):
                sealed[stage] = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
        return cls(output, lease=lease, sealed=sealed)

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

    def result(self, stage: Stage):
        """The result a finished stage recorded, as its type."""
        record = self.record(stage.name)
        if record is None:
            raise RuntimeError(f"stage {stage.name} has no trusted record under "
                               f"{self.output}: another job wrote into this output; rerun")
        return results.load(stage.result, record["info"], stage.name)

    def finish(self, stage: str, info, seconds: float, key: str = "",
               fields: dict | None = None, deps: dict | None = None, held=None) -> None:
        """Commits a stage: its record, written last (a stage without one is unfinished and
        runs again). With `held` (the output's lease) the record is written under it and
        names the lease that wrote it."""
        record = storage.json_bytes({
            "stage": stage, "key": key, "fields": fields or {}, "deps": deps or {},
            "seconds": seconds, "info": results.dump(info), "lease": held.token if held else ""})
        if held is None:
            storage.write_bytes(self.manifest_uri(stage), record)
        else:
            held.write(self.manifest_uri(stage), record)
