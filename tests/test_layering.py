"""Layers: the math (pipeline/quant, pipeline/index) imports no Ray or torch.distributed; no
stage imports another stage; the benchmarks import no stage."""
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
            if node.module == "pipeline.stages":  # from pipeline.stages import train
                names += [f"pipeline.stages.{a.name}" for a in node.names]
    out[f] = names
print(json.dumps(out))
"""


@functools.cache
def _all_imports() -> dict[str, list[str]]:
    files = sorted(str(f) for d in ("pipeline", "bench") for f in (ROOT / d).rglob("*.py"))
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


STAGES = {"ingest", "init", "teacher", "train", "build", "evaluate"}


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
