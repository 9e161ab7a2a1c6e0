"""faiss-gpu: which indexes it can take and with what options, and the CPU where it cannot.

faiss's GPU cloner refuses, or fails inside, several of the indexes this pipeline trains:
- IVFPQ with 8-bit codes keeps a look-up table of 4 · M · 256 bytes per query in shared
  memory; above GPU_LUT_BYTES it needs float16 tables (`useFloat16`);
- codes other than 8 bits need the interleaved list layout (`interleavedLayout`);
- an HNSW coarse quantizer has no GPU form: the GPU index takes a flat copy of its
  centroids (the same centroids; each vector goes to its exact nearest list);
- additive quantizers (IVF-RQ, IVF-LSQ) and fast-scan indexes have no GPU form at all: they
  stay on the CPU, with one warning per process naming why.
One StandardGpuResources per process: each one reserves scratch memory on the device.
"""
from __future__ import annotations

import logging

import faiss

log = logging.getLogger("ivf_distill.index.gpu")

# The shared memory faiss-gpu's IVFPQ scan may use for a query's float32 look-up table.
GPU_LUT_BYTES = 48 << 10

_resources: list = []
_warned: set = set()


def gpu_count() -> int:
    """GPUs this faiss can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def library() -> str:
    """faiss-gpu or faiss-cpu, with its version: what a stage record names."""
    return f"{'faiss-gpu' if hasattr(faiss, 'StandardGpuResources') else 'faiss-cpu'} " \
           f"{faiss.__version__}"


def resources():
    """This process's GPU resources, made once."""
    if not _resources:
        _resources.append(faiss.StandardGpuResources())
    return _resources[0]


def _inner_ivf(index):
    return faiss.extract_index_ivf(index)


def why_not(index) -> str:
    """Why faiss-gpu cannot hold `index` ('' when it can)."""
    ivf = faiss.downcast_index(_inner_ivf(index))
    if isinstance(ivf, (faiss.IndexIVFAdditiveQuantizer, faiss.IndexIVFFastScan)):
        return f"faiss-gpu has no GPU form of {type(ivf).__name__}"
    if not isinstance(ivf, (faiss.IndexIVFPQ, faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return f"faiss-gpu does not clone {type(ivf).__name__}"
    return ""


def cloner_options(index):
    """The GpuClonerOptions `index` needs (faiss-gpu's rules, in the module docstring)."""
    co = faiss.GpuClonerOptions()
    ivf = faiss.downcast_index(_inner_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):
        nbits = ivf.pq.nbits
        co.useFloat16 = 4 * ivf.pq.M * (1 << nbits) > GPU_LUT_BYTES
        co.interleavedLayout = nbits != 8
    return co


def flat_coarse(index):
    """`index` itself, or, when its coarse quantizer is an HNSW graph, a copy whose coarse
    quantizer is a flat index over the same centroids (what faiss-gpu can clone)."""
    quantizer = faiss.downcast_index(_inner_ivf(index).quantizer)
    if not isinstance(quantizer, faiss.IndexHNSW):
        return index
    index = faiss.clone_index(index)
    ivf = _inner_ivf(index)
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(quantizer.storage.reconstruct_n(0, quantizer.ntotal))
    old = ivf.quantizer
    if ivf.own_fields:
        old.this.own(True)  # the clone's graph is freed with its Python handle
    ivf.quantizer = flat
    flat.this.disown()
    ivf.own_fields = True
    del old
    return index


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        log.warning("%s: encoding on the CPU", why)


def encode(trained, ids, x, use_gpu: bool):
    """A copy of `trained` holding x under `ids`, encoded on GPU 0 where faiss-gpu can hold
    it, else on the CPU; (index, device) with device "cuda:0" or "cpu"."""
    if use_gpu and not gpu_count():
        _warn_once(f"GPUs were asked for, but this node's faiss sees none ({library()})")
    elif use_gpu:
        why = why_not(trained)
        if not why:
            # A shard's lists are what the merge takes; its coarse quantizer is dropped there.
            index = flat_coarse(trained)
            gpu = faiss.index_cpu_to_gpu(resources(), 0, index, cloner_options(index))
            gpu.add_with_ids(x, ids)
            return faiss.index_gpu_to_cpu(gpu), "cuda:0"
        _warn_once(why)
    index = faiss.clone_index(trained)
    index.add_with_ids(x, ids)
    return index, "cpu"
