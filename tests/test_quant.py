"""The student model and the training kernel, checked against faiss and against themselves."""
import numpy as np
import pytest
import torch

from pipeline.config import IndexConfig, TrainConfig
from pipeline.index import build, knn, ondisk
from pipeline.quant import train as T
from pipeline.quant.losses import listwise_kl, relative_tau
from pipeline.quant.model import IVFPQStudent

from .conftest import normalized


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1)
    xb, xq = normalized(rng, 6000, 32), normalized(rng, 600, 32)
    trained = build.train_baseline(xb, IndexConfig(nlist=16, M=4, nbits=6, opq=True), niter=5)
    _, _, V = knn.block_topk(xq, xb, np.arange(len(xb)), 8, "ip", with_vectors=True)
    return xb, xq, trained, V


def test_student_reconstructs_like_faiss(setup):
    xb, xq, trained, _ = setup
    model = IVFPQStudent(build.extract_params(trained), "ip")
    index = ondisk.encode_shard(trained, np.arange(len(xb)), xb)
    build.set_nprobe(index, 16)
    D, I = index.search(xq[:20], 5)
    with torch.no_grad():
        q = model.rotate(torch.as_tensor(xq[:20]))
        c, r, _ = model.quantize(model.rotate(torch.as_tensor(xb)))
        s = model.score(q, c + r).numpy()
    np.testing.assert_allclose(np.take_along_axis(s, I, 1), D, rtol=1e-4, atol=1e-4)


def test_rotation_stays_orthogonal_and_loss_falls(setup):
    xb, xq, trained, V = setup
    cfg = TrainConfig(batch_size=50, negatives=64, rotation_lr=1e-2, epochs=3)
    model = IVFPQStudent(build.extract_params(trained), "ip")
    opt = T.make_optimizer(model, cfg)
    data = T.TrainData(xq, V, xb[:2000])
    losses = [T.train_epoch(model, opt, data, cfg, e)["loss"] for e in range(cfg.epochs)]
    assert losses[-1] < losses[0]
    R = model.rotation().detach()
    np.testing.assert_allclose((R @ R.T).numpy(), np.eye(32), atol=1e-4)
    assert not torch.allclose(R, model.rotation0), "the rotation was learned"


def test_kl_is_zero_when_student_matches_teacher():
    t = torch.tensor([[3.0, 1.0, -torch.inf, 0.5]])
    tau = relative_tau(t, 0.5)
    assert listwise_kl(t, t.clone(), tau).item() == pytest.approx(0, abs=1e-6)
    assert listwise_kl(t, torch.tensor([[0.0, 3.0, 9.0, 0.5]]), tau).item() > 0.1


def test_data_parallel_gradients_sum_to_the_global_batch(setup):
    """Gradients of two equal slices, summed (the all-reduce), equal the one-process gradient
    of the whole global batch: the kernel side of the 2-worker equivalence."""
    xb, xq, trained, V = setup
    cfg = TrainConfig(batch_size=64, negatives=32, in_batch=False)
    params = build.extract_params(trained)
    neg = torch.as_tensor(T._negatives(xb[:1000], 32, 0, 0, 0))

    def summed_grads(world):
        per_rank = []
        for r in range(world):
            model = IVFPQStudent(params, "ip")
            idx = np.arange(r * 64 // world, (r + 1) * 64 // world)
            q, pos = torch.as_tensor(xq[idx]), torch.as_tensor(V[idx].astype(np.float32))
            a, b, c = T.batch_loss(model, q, pos, neg, cfg, in_batch=False)
            ((a + b + 0.5 * c) / cfg.batch_size).backward()
            per_rank.append([p.grad for p in model.parameters() if p.requires_grad])
        return [sum(gs) for gs in zip(*per_rank)]

    for g1, g2 in zip(summed_grads(1), summed_grads(2)):
        np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-4, atol=1e-7)
