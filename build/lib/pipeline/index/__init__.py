"""The faiss layer: exact kNN, index construction and export, the on-disk lists."""
try:
    import faiss  # noqa: F401
except ModuleNotFoundError as e:  # the package installs faiss through an extra, not by itself
    raise ModuleNotFoundError(
        "faiss is not installed: install this package with the [cpu] extra (faiss-cpu) or, "
        "on CUDA 12 GPU nodes, the [gpu] extra (faiss-gpu-cu12), e.g. pip install '.[cpu]'"
    ) from e
