"""The Python API: build an index, open it to search.

    import pipeline
    result = pipeline.build("s3://bucket/corpus", "s3://bucket/runs/r1",
                            train_queries="s3://bucket/train_queries", index={"M": 16})
    index = pipeline.open_index("s3://bucket/runs/r1")
    scores, ids = index.search(queries, k=10, nprobe=32)

`build` is `ivf-distill build`: the same stages, reruns, lease and published versions.
`open_index` is pipeline.reader.open_index, which imports neither torch nor Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.reader import Index, open_index

__all__ = ["BuildResult", "Index", "build", "open_index"]


@dataclass(frozen=True)
class BuildResult:
    output: str
    version: str
    rows: list  # the evaluation table: one dict per index and nprobe
    seconds: dict  # wall seconds per stage that ran
    manifest: dict  # what manifest.json now says


def build(corpus: str, output: str, *, preset: str | None = None,
          train_queries: str | None = None, eval_queries: str | None = None,
          labels: str | None = None, overrides: list[str] = (),
          **sections: dict) -> BuildResult:
    """Builds (or brings up to date) the index of `corpus` under `output` (local paths or
    s3:// prefixes) and publishes it as a new version. `preset` names a shipped preset or a
    YAML file; `sections` are config sections as dicts (index={"nlist": 1024, "M": 16},
    data={"metric": "l2"}), `overrides` KEY=VALUE strings as `--set` takes them. Ray is
    started locally unless ray.address (or RAY_ADDRESS) names a cluster."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    data = dict(sections.pop("data", {}), corpus=corpus)
    evaluation = dict(sections.pop("eval", {}))
    if train_queries:
        data["train_queries"] = train_queries
    if eval_queries:
        evaluation["queries"] = eval_queries
    if labels:
        evaluation["labels"] = labels
    cfg = load_config(preset, list(overrides), {**sections, "data": data, "eval": evaluation})
    result = run_pipeline(cfg, output)
    manifest = result["manifest"]
    return BuildResult(output, manifest["version"], result["rows"], result["seconds"],
                       manifest)
