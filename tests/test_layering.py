"""The math layers (pipeline/quant, pipeline/index) must not import Ray or torch.distributed."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layer", ["pipeline/quant", "pipeline/index"])
def test_math_layers_import_no_ray(layer):
    for f in (ROOT / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert not n.startswith(("ray", "torch.distributed")), f"{f} imports {n}"
