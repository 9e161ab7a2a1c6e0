"""Learned, retrieval-oriented vector quantization on Ray: distilled IVF/PQ/OPQ, FAISS indexes.

`pipeline.build(...)` and `pipeline.open_index(...)` are the Python API (pipeline.api); the
`ivf-distill` command is pipeline.cli. Importing the package loads neither torch nor Ray."""
import logging

logging.getLogger("ivf_distill").addHandler(logging.NullHandler())

__all__ = ["build", "open_index"]


def __getattr__(name: str):
    if name == "build":
        from pipeline.api import build

        return build
    if name == "open_index":
        from pipeline.reader import open_index

        return open_index
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
