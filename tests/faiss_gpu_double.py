"""A stand-in for faiss-gpu's entry points, on faiss-cpu, that keeps faiss-gpu's rules.

`FaissGpu.install(monkeypatch)` gives the faiss module one GPU: `StandardGpuResources`
(counted), `GpuClonerOptions`, `index_cpu_to_gpu` and `index_gpu_to_cpu`. The "GPU index"
is a CPU clone, so codes and answers are faiss's own, but the cloner refuses what
faiss-gpu refuses (its documentation and GpuIndexIVFPQ's checks):
- IndexIVFPQ with 8-bit codes whose float32 look-up table (4 · M · 256 bytes) exceeds
  48 KiB of shared memory, unless useFloat16;
- IndexIVFPQ with codes other than 8 bits, unless interleavedLayout; without it, only the
  sub-quantizer counts GpuIndexIVFPQ supports;
- a coarse quantizer that is not flat (IndexHNSW among them);
- indexes with no GPU form: additive quantizers (RQ, LSQ) and fast-scan.
"""
from __future__ import annotations

import faiss

LUT_BYTES = 48 << 10
PQ_M = {1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96}


class GpuClonerOptions:
    def __init__(self):
        self.useFloat16 = False
        self.interleavedLayout = False


class FaissGpu:
    def __init__(self):
        self.resources = 0  # StandardGpuResources made
        self.clones: list[dict] = []  # the options each accepted clone had

    def install(self, monkeypatch) -> FaissGpu:
        double = self

        class StandardGpuResources:
            def __init__(self):
                double.resources += 1

        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
        monkeypatch.setattr(faiss, "StandardGpuResources", StandardGpuResources, raising=False)
        monkeypatch.setattr(faiss, "GpuClonerOptions", GpuClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.index_cpu_to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
        return self

    def index_cpu_to_gpu(self, res, device: int, index, co=None):
        co = co or GpuClonerOptions()
        assert device == 0
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, (faiss.IndexIVFAdditiveQuantizer, faiss.IndexIVFFastScan)):
            raise RuntimeError(f"Error: could not clone {type(ivf).__name__} to the GPU")
        quantizer = faiss.downcast_index(ivf.quantizer)
        if not isinstance(quantizer, faiss.IndexFlat):
            raise RuntimeError(f"Error: the coarse quantizer {type(quantizer).__name__} "
                               "cannot be cloned to the GPU")
        if isinstance(ivf, faiss.IndexIVFPQ):
            M, nbits = ivf.pq.M, ivf.pq.nbits
            if nbits != 8 and not co.interleavedLayout:
                raise RuntimeError(f"Error: {nbits}-bit codes need interleavedLayout")
            if not co.interleavedLayout and M not in PQ_M:
                raise RuntimeError(f"Error: {M} sub-quantizers are not supported")
            if 4 * M * (1 << nbits) > LUT_BYTES and not co.useFloat16:
                raise RuntimeError("Error: the look-up table exceeds shared memory; "
                                   "use float16 look-up tables (useFloat16)")
        self.clones.append({"useFloat16": co.useFloat16,
                            "interleavedLayout": co.interleavedLayout})
        return faiss.clone_index(index)
