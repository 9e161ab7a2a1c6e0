"""Which code wrote an output: the package version, its git commit where the package runs
from a checkout, and the versions of the libraries that shape an index's bytes."""
from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata

LIBRARIES = ("faiss-cpu", "faiss-gpu-cu12", "torch", "ray", "numpy", "pyarrow")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the checkout this package was loaded from, None for an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@functools.cache
def software() -> dict:
    """{"ivf-distill": version, "git_commit": ..., library: version} (None where absent)."""
    out = {"ivf-distill": _version("ivf-distill"), "git_commit": _git_commit()}
    out.update({lib: v for lib in LIBRARIES if (v := _version(lib)) is not None})
    return out
