"""The package as users get it: a wheel installed into a fresh virtual environment outside the
checkout, whose `ivf-distill` command builds and searches an index; and the README's reading
snippet in an environment that holds only faiss-cpu, numpy, pyarrow and s3fs (and what they
need), where torch, Ray and YAML cannot be imported."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
READER_PACKAGES = ("faiss-cpu", "numpy", "pyarrow", "s3fs")


def _clean_env(**extra) -> dict:
    """The environment without this session's Ray cluster or Python path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PYTHONPATH") and not k.startswith("IVF_DISTILL_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's bin folder, a work folder outside the checkout): the package's wheel built from
    this checkout and installed into a new venv. Its dependencies come from this interpreter's
    site-packages through a path file (installing them again would take minutes and a
    network); the package itself, commands and presets come from the wheel alone."""
    tmp = tmp_path_factory.mktemp("install")
    wheels, src = tmp / "wheels", tmp / "src"
    # Built from a copy: a build writes build/ and *.egg-info beside the sources.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   cwd=tmp, env=_clean_env())
    wheel = next(wheels.glob("ivf_distill-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    (pathlib.Path(site.stdout.strip()) / "deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=_clean_env())
    work = tmp / "work"
    work.mkdir()
    return venv / "bin", work


def test_the_wheel_gives_the_command_its_presets_and_the_package(installed):
    bin_dir, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c", "import pipeline; print("
                            "pipeline.__file__)"], cwd=work, env=_clean_env(),
                           capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where and "site-packages" in where, where
    help_ = subprocess.run([str(bin_dir / "ivf-distill"), "--help"], cwd=work,
                           env=_clean_env(), capture_output=True, text=True, check=True)
    for command in ("build", "search", "copy", "rollback", "prepare", "presets"):
        assert f"  {command} " in help_.stdout
    sub = subprocess.run([str(bin_dir / "ivf-distill"), "build", "--help"], cwd=work,
                         env=_clean_env(), capture_output=True, text=True, check=True)
    assert "usage: ivf-distill build" in sub.stdout
    presets = subprocess.run([str(bin_dir / "ivf-distill"), "presets", "smoke"], cwd=work,
                             env=_clean_env(), capture_output=True, text=True, check=True)
    assert "nlist: 16" in presets.stdout


@pytest.mark.slow
def test_the_installed_command_builds_and_searches(installed):
    bin_dir, work = installed
    cmd = str(bin_dir / "ivf-distill")
    env = _clean_env()

    def run(*args):
        res = subprocess.run([cmd, *args], cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    run("prepare", "--synthetic", "2000", "--dim", "16", "--out", "data")
    built = run("build", "--config", "smoke", "--output", "out",
                "--set", "data.corpus=data/corpus",
                "--set", "data.train_queries=data/train_queries",
                "--set", "eval.queries=data/eval_queries", "--set", "eval.labels=data/labels",
                "--set", "ray.num_cpus=2", "--set", "index.nlist=auto")
    assert "version:" in built.stdout
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["software"]["ivf-distill"] == metadata.version("ivf-distill")
    assert manifest["software"]["git_commit"] is None  # a wheel knows no checkout
    # auto: 4 sqrt(2,000) = 179 -> 128, at most 2,000 / 39 = 51 -> 32
    assert manifest["parameters"]["nlist"] == 32
    found = run("search", "--index", "out", "--queries", "data/eval_queries", "-k", "5",
                "--nprobe", "4")
    lines = found.stdout.strip().splitlines()
    assert len(lines) == 125  # the eval queries of 2,000 synthetic vectors (a quarter of 500)
    assert all(len(line.split("\t")[1].split()) == 5 for line in lines)


def _closure(names) -> list[metadata.Distribution]:
    """The installed distributions `names` need, themselves included (extras left out)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "extra": ""}
    seen, todo = {}, list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        dist = metadata.distribution(name)
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return list(seen.values())


def _top_level(dist: metadata.Distribution) -> set[str]:
    out = set()
    for f in dist.files or []:
        top = f.parts[0]
        if top != ".." and not top.endswith(".pth") and top != "__pycache__":
            out.add(top)
    return out


@pytest.fixture(scope="module")
def reader_env(tmp_path_factory):
    """A folder holding only the reader's packages (links into this interpreter's
    site-packages) and this checkout's `pipeline`, for `python -S` with PYTHONPATH on it."""
    folder = tmp_path_factory.mktemp("reader-env")
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    for dist in _closure(READER_PACKAGES):
        for top in _top_level(dist):
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    (folder / "pipeline").symlink_to(ROOT / "pipeline")
    return folder


def readme_snippet() -> str:
    """The README's Python block that opens a published index."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "open_index" in b]
    assert len(found) == 1, "README.md must hold one python block that calls open_index"
    return found[0]


def test_the_readme_snippet_reads_an_index_without_torch_ray_or_yaml(reader_env, s3_smoke_run,
                                                                      tmp_path):
    data, out = s3_smoke_run
    from pipeline.data import readers

    ids, xq = readers.read_all(f"{data}/eval_queries", "queries")
    np.save(tmp_path / "queries.npy", xq)
    snippet = readme_snippet()
    assert '"s3://my-bucket/runs/r1"' in snippet and '"queries.npy"' in snippet
    code = snippet.replace('"s3://my-bucket/runs/r1"', repr(out)).replace(
        '"queries.npy"', repr(str(tmp_path / "queries.npy")))
    check = code + (
        "\nimport sys, importlib.util\n"
        "for m in ('torch', 'ray', 'yaml'):\n"
        "    assert importlib.util.find_spec(m) is None, m + ' is importable'\n"
        "    assert m not in sys.modules\n"
        "print(index.version, ids.shape, scores.shape)\n")
    env = _clean_env(PYTHONPATH=str(reader_env), IVF_DISTILL_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-S", "-c", check], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"({len(ids)}, 10) ({len(ids)}, 10)" in res.stdout
    cached = list((tmp_path / "cache").rglob("index.ivfdata"))
    assert cached, "the S3 copies are kept in the cache folder"
    # A second open finds them there: nothing is fetched again.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    again = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert after == before
