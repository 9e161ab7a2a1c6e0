"""The config from YAML and `section.key=value` overrides: unknown keys and wrong types are
errors naming the key and what is accepted, before any work starts."""
from __future__ import annotations

import dataclasses
import os
import typing
from importlib import resources

import yaml

from pipeline.config.modes import coerce
from pipeline.config.sections import PipelineConfig
from pipeline.errors import InputError

# Keys that an earlier layout of the config had, and where they live now: a config written
# for it fails with the new name instead of a bare "unknown key".
MOVED = {
    "data.eval_queries": "eval.queries", "data.labels": "eval.labels",
    "data.max_eval_queries": "eval.max_queries", "index.metric": "data.metric",
    "init.train_sample": "data.train_sample",
    "train.val_fraction": "teacher.val_fraction",
    "train.loss": "loss.kind", "train.rank_top": "loss.rank_top",
    "train.temperature": "loss.temperature", "train.kl_temperature": "loss.kl_temperature",
    "train.kl_weight": "loss.kl_weight", "train.band_weighting": "loss.band_weighting",
    "train.ivf_weight": "loss.ivf_weight", "train.recon_weight": "loss.recon_weight",
    "train.balance_weight": "loss.balance_weight", "train.sinkhorn_iters": "loss.sinkhorn_iters",
    "train.contrastive_weight": "loss.contrastive_weight",
    "train.soft_temperature": "loss.soft_temperature",
    "train.negatives": "negatives.corpus", "train.list_negatives": "negatives.per_list",
    "train.negative_sampler": "negatives.sampler",
    "train.ivf_negative_nprobe": "negatives.ivf_nprobe", "train.in_batch": "negatives.in_batch",
    "train.num_workers": "ray.train_workers", "train.use_gpu": "ray.train_gpu",
    "train.max_failures": "ray.max_failures", "build.list_ranges": "build.output_parts",
    "ray.merge_ranges": "build.output_parts",
}


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise InputError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    moved = [f"{where}{k} is now {MOVED[where + k]}" for k in unknown if where + k in MOVED]
    if moved:
        raise InputError(f"config key(s) moved: {'; '.join(moved)} (docs/configuration.md)")
    if unknown:
        raise InputError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, typ, f"{where}{name}")
    return cls(**kwargs)


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise InputError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"override {override!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise InputError(f"override {override!r}: the value is not valid YAML: {e}") from None


def presets() -> list[str]:
    """The names of the presets shipped with the package (pipeline/presets/*.yaml)."""
    return sorted(f.name[:-5] for f in resources.files("pipeline.presets").iterdir()
                  if f.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in presets():
        raise InputError(f"no preset {name!r}; the presets are {', '.join(presets())}")
    return resources.files("pipeline.presets").joinpath(f"{name}.yaml").read_text()


def _config_text(path: str) -> str:
    """A preset's text by name (demo, smoke, example), else the file at path."""
    if os.sep not in path and not path.endswith((".yaml", ".yml")) and path in presets():
        return preset_text(path)
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"--config: {path} does not exist (a file, or one of the presets: "
                         f"{', '.join(presets())})") from None


def _merge(raw: dict, settings: dict, where: str = "") -> None:
    for key, value in settings.items():
        if isinstance(value, dict):
            node = raw.setdefault(key, {})
            if not isinstance(node, dict):
                raise InputError(f"{where}{key} is not a section")
            _merge(node, value, f"{where}{key}.")
        else:
            raw[key] = value


def load_config(path: str | None = None, overrides: list[str] = (),
                settings: dict | None = None) -> PipelineConfig:
    """The config from a YAML file or a preset's name, then `settings` (sections as nested
    dicts, e.g. {"index": {"M": 16}}), then `overrides` (KEY=VALUE strings) applied."""
    raw: dict = {}
    if path:
        text = _config_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise InputError(f"--config: {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise InputError(f"--config: {path} must be a mapping of sections (data:, index:, "
                             f"...), not a {type(raw).__name__}")
    _merge(raw, settings or {})
    for o in overrides:
        _apply_override(raw, o)
    cfg = _build(PipelineConfig, raw, "")
    validate(cfg)
    return cfg


def validate_for_pipeline(cfg: PipelineConfig) -> None:
    """Settings that the benchmark accepts but the pipeline cannot honour."""
    if cfg.ray.train_gpu:
        import torch

        if torch.version.cuda is None:
            raise InputError(
                f"ray.train_gpu=true needs a CUDA build of torch, and this one "
                f"({torch.__version__}) is CPU-only: Ray Train would fail joining the workers "
                "(no NCCL). Install the CUDA build (README: Install; the cluster image has it) "
                "or set ray.train_gpu=false")
    if cfg.loss.contrastive_weight > 0:
        raise InputError(
            "loss.contrastive_weight > 0 needs labels for the training queries, which the "
            "pipeline's teacher stream does not carry (and the shared data's rules forbid); "
            "compare it with bench/quality.py --train-labels PATH instead")
    tr, workers = cfg.train, cfg.ray.train_workers
    # The pipeline's training streams (pipeline.data.teacher_stream); the benchmark trains
    # in memory and has none.
    if tr.streams < 1 or tr.streams % workers or tr.batch_size % tr.streams:
        raise InputError(
            f"train.streams ({tr.streams}) must be a multiple of ray.train_workers "
            f"({workers}) and divide train.batch_size ({tr.batch_size}): every worker "
            "reads whole streams, and every stream gives each batch the same number of rows")


def validate(cfg: PipelineConfig) -> None:
    """What a config loaded for the pipeline needs beyond its sections' own checks (which ran
    when they were made): an index with lists, a corpus.
    Checks against the data's dimension live in ingest."""
    if cfg.index.nlist != "auto" and cfg.index.nlist < 1:
        raise InputError("index.nlist must be >= 1: the pipeline builds IVF indexes")
    if not cfg.data.corpus:
        raise InputError("data.corpus is empty: set it to a local path or s3:// prefix")
