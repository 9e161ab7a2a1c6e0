"""The GPU paths of encode, on faiss-cpu: the options faiss-gpu needs and the CPU where it
has no GPU form, against tests/faiss_gpu_double.py, which refuses what faiss-gpu refuses."""
import logging

import faiss
import numpy as np
import pytest

from pipeline.config import Coarse, IndexConfig, Quantizer
from pipeline.index import build, gpu

from .answers import assert_same_answers
from .conftest import normalized
from .faiss_gpu_double import FaissGpu


@pytest.fixture
def faiss_gpu(monkeypatch):
    monkeypatch.setattr(gpu, "_resources", [])
    monkeypatch.setattr(gpu, "_warned", set())
    return FaissGpu().install(monkeypatch)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return normalized(rng, 3000, 128), normalized(rng, 50, 128)


def _train(x, **kw):
    return build.train_baseline(x, IndexConfig(nlist=16, **kw), niter=4, opq_niter=2)


def _same_as_cpu(trained, x, xq, got):
    want = faiss.clone_index(trained)
    want.add_with_ids(x, np.arange(len(x)))
    for index in (got, want):
        build.set_nprobe(index, 16)
    assert_same_answers(got.search(xq, 10), want.search(xq, 10))


@pytest.mark.parametrize("M, nbits, float16, interleaved", [
    (64, 8, True, False),  # 4 * 64 * 256 B = 64 KiB of look-up table: float16 needed
    (16, 8, False, False),
    (32, 4, False, True),  # 4-bit codes: the interleaved layout
])
def test_ivfpq_clones_with_the_options_faiss_gpu_needs(faiss_gpu, data, M, nbits, float16,
                                                       interleaved):
    x, xq = data
    trained = _train(x, M=M, nbits=nbits, opq=True)
    if float16 or interleaved:  # what faiss-gpu refuses with its default options
        with pytest.raises(RuntimeError, match="useFloat16|interleavedLayout"):
            faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, trained)
    got, device = gpu.encode(trained, np.arange(len(x)), x, use_gpu=True)
    assert device == "cuda:0"
    assert faiss_gpu.clones[-1] == {"useFloat16": float16, "interleavedLayout": interleaved}
    _same_as_cpu(trained, x, xq, got)


def test_an_hnsw_coarse_quantizer_goes_to_the_gpu_as_flat_centroids(faiss_gpu, data):
    x, xq = data
    trained = build.train_baseline(x, IndexConfig(nlist=16, M=16, nbits=8, opq=False,
                                                  coarse=Coarse.HNSW), niter=4)
    with pytest.raises(RuntimeError, match="coarse quantizer"):
        faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, trained)
    got, device = gpu.encode(trained, np.arange(len(x)), x, use_gpu=True)
    assert device == "cuda:0" and len(faiss_gpu.clones) == 1
    # the same lists as exact assignment over the same centroids
    _same_as_cpu(gpu.flat_coarse(trained), x, xq, got)
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(trained).quantizer),
                      faiss.IndexHNSW), "the trained index keeps its graph"


@pytest.mark.parametrize("quantizer", [Quantizer.RQ, Quantizer.LSQ])
def test_additive_indexes_fall_back_to_the_cpu_with_one_warning(faiss_gpu, data, quantizer,
                                                                caplog):
    x, xq = data
    trained = build.train_baseline(x[:1500], IndexConfig(nlist=16, M=4, nbits=6, opq=False,
                                                         quantizer=quantizer), niter=4)
    with caplog.at_level(logging.WARNING, logger="ivf_distill.index.gpu"):
        for _ in range(2):
            got, device = gpu.encode(trained, np.arange(len(x)), x, use_gpu=True)
            assert device == "cpu"
    warned = [r.message for r in caplog.records if "encoding on the CPU" in r.message]
    assert len(warned) == 1 and "has no GPU form" in warned[0], warned
    assert not faiss_gpu.clones


def test_one_gpu_resources_object_per_process(faiss_gpu, data):
    x, _ = data
    trained = _train(x, M=16, nbits=8, opq=False)
    for _ in range(3):
        assert gpu.encode(trained, np.arange(100), x[:100], use_gpu=True)[1] == "cuda:0"
    assert faiss_gpu.resources == 1 and len(faiss_gpu.clones) == 3


def test_without_gpus_it_encodes_on_the_cpu(data):
    x, _ = data
    trained = _train(x, M=16, nbits=8, opq=False)
    if gpu.gpu_count():
        pytest.skip("this faiss has GPUs")
    assert gpu.encode(trained, np.arange(100), x[:100], use_gpu=True)[1] == "cpu"
    assert gpu.library().startswith("faiss-cpu ")


def test_the_gpu_check_runs_its_cpu_half(tmp_path):
    """bench/gpu_check.py on this machine: every check runs on the CPU and says the device
    half is not available (a lent GPU machine runs both halves)."""
    import json
    import subprocess
    import sys

    from .test_e2e import ROOT

    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    checks = [r["check"] for r in rows]
    assert checks[0].startswith("teacher top-100") and "train pq" in checks[1] and \
        "train rq" in checks[2], checks
    assert all("pairs/s" in r["cpu"] or "steps/s" in r["cpu"] for r in rows[:3])
    import torch

    if not torch.cuda.is_available():  # the device half says it did not run
        assert "cuda: not available" in res.stdout and not any("device" in r for r in rows[:3])
