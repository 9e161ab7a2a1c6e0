"""Layers: every module of pipeline/ belongs to one layer and imports only its own layer and
the ones below; nothing below the Ray plumbing imports Ray; the math (pipeline/quant,
pipeline/index) imports no Ray, torch.distributed, storage or data; no stage imports another
stage; the benchmarks import no stage."""
import functools
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Parsed in a fresh interpreter: CPython 3.11.7's ast.parse can fail with "AST constructor
# recursion depth mismatch" in a process that runs many threads (this one runs the Ray
# client's), and a layering test must fail only when a layer is broken.
_IMPORTS = """
import ast, json, pathlib, sys
out = {}
for f in sys.argv[1:]:
    names = []
    for node in ast.walk(ast.parse(pathlib.Path(f).read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module.startswith("pipeline"):  # from pipeline import storage: a module
                names += [f"{node.module}.{a.name}" for a in node.names]
    out[f] = names
print(json.dumps(out))
"""


@functools.cache
def _all_imports() -> dict[str, list[str]]:
    files = sorted(str(f) for d in ("pipeline", "bench", "jobs") for f in (ROOT / d).rglob("*.py"))
    res = subprocess.run([sys.executable, "-c", _IMPORTS, *files], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout)


def imported_modules(f: pathlib.Path) -> list[str]:
    return _all_imports()[str(f)]


@pytest.mark.parametrize("layer", ["pipeline/quant", "pipeline/index"])
def test_math_layers_import_no_ray(layer):
    files = list((ROOT / layer).rglob("*.py"))
    assert files
    for f in files:
        for n in imported_modules(f):
            assert not n.startswith(("ray", "torch.distributed")), f"{f} imports {n}"


STAGES = {"ingest", "init", "teacher", "train", "encode", "evaluate"}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["pipeline", "stages"] and len(parts) > 2 and parts[2] in STAGES:
        return parts[2]
    return None


def test_no_stage_imports_another_stage():
    for f in (ROOT / "pipeline" / "stages").glob("*.py"):
        for n in imported_modules(f):
            assert stage_of(n) in (None, f.stem), f"{f.name} imports the stage {n}"


def test_benchmarks_and_layers_below_import_no_stage():
    files = [f for d in ("bench", "pipeline/quant", "pipeline/index", "pipeline/data")
             for f in (ROOT / d).glob("*.py")]
    for f in files:
        for n in imported_modules(f):
            assert stage_of(n) is None, f"{f} imports the stage {n}"


# Lowest first. A module imports only modules of its own layer or of lower ones.
LAYERS = [
    ("foundation", ["pipeline.config", "pipeline.storage", "pipeline.console", "pipeline.events",
                    "pipeline.report", "pipeline.errors", "pipeline.presets",
                    "pipeline.provenance"]),
    ("math and data", ["pipeline.index", "pipeline.quant", "pipeline.data",
                       "pipeline.checkpoint"]),
    ("runs", ["pipeline.keys", "pipeline.lease", "pipeline.publish", "pipeline.workflow",
              "pipeline.reader"]),
    ("Ray plumbing", ["pipeline.distributed"]),
    ("stages", ["pipeline.stages"]),
    ("runner", ["pipeline.runner"]),
    ("commands", ["pipeline.cli", "pipeline.api", "pipeline.__main__"]),
    ("entry points", ["jobs", "bench"]),  # the scripts and benchmarks: nothing imports them
]
RAY_FROM = 3  # the first layer that may import Ray


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def module_name(f: pathlib.Path) -> str:
    rel = f.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pipeline_modules() -> list[pathlib.Path]:
    """Every module the layers cover: the package, the commands and the benchmarks."""
    return sorted(f for d in ("pipeline", "jobs", "bench") for f in (ROOT / d).rglob("*.py"))


def test_every_module_has_a_layer():
    for f in pipeline_modules():
        name = module_name(f)
        assert name == "pipeline" or layer_of(name) is not None, f"{name}: add it to LAYERS"


def layer_violations(f: pathlib.Path, imports: list[str]) -> list[str]:
    name = module_name(f)
    own = layer_of(name)
    if own is None:
        return []
    out = []
    for n in imports:
        other = layer_of(n)
        if other is not None and other > own:
            out.append(f"{name} ({LAYERS[own][0]}) imports {n} ({LAYERS[other][0]})")
        if own < RAY_FROM and n.split(".")[0] == "ray":
            out.append(f"{name} ({LAYERS[own][0]}) imports Ray ({n})")
    if name.startswith(("pipeline.index", "pipeline.quant")):
        out += [f"{name} (the math) imports {n}" for n in imports
                if n.startswith(("pipeline.storage", "pipeline.data"))]
    return out


def test_every_module_imports_only_its_layer_and_below():
    bad = [v for f in pipeline_modules() for v in layer_violations(f, imported_modules(f))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module, probe", [
    ("pipeline/distributed/exact_knn.py", "pipeline.stages.teacher"),
    ("pipeline/workflow/stage.py", "pipeline.distributed.tasks"),
    ("pipeline/data/readers.py", "pipeline.distributed.tasks"),
    ("pipeline/publish.py", "ray"),
    ("pipeline/quant/fit.py", "pipeline.storage"),
    ("pipeline/config/sections.py", "pipeline.index.build"),
    ("pipeline/runner.py", "jobs.distill"),
])
def test_a_probe_import_breaking_a_rule_is_caught(module, probe):
    """The checker itself: one import that breaks a rule makes it report."""
    f = ROOT / module
    assert not layer_violations(f, imported_modules(f))
    assert layer_violations(f, imported_modules(f) + [probe])
