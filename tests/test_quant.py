"""The student model and the training kernel, checked against faiss and against themselves."""
import dataclasses
import os
import threading

import faiss
import numpy as np
import pytest
import torch

from pipeline.config import (
    IndexConfig,
    LossConfig,
    NegativesConfig,
    Quantizer,
    TrainConfig,
    load_config,
)
from pipeline.index import build, knn, ondisk
from pipeline.index.params import Params, QuantizerSpec
from pipeline.quant import fit, loop, negatives, objective
from pipeline.quant.losses import ListLosses, sinkhorn_balance, sinkhorn_plan
from pipeline.quant.model import Student

from .answers import assert_same_answers
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
    model = Student(build.extract_params(trained), "ip")
    index = ondisk.encode_shard(trained, np.arange(len(xb)), xb)
    build.set_nprobe(index, 16)
    D, I = index.search(xq[:20], 5)
    with torch.no_grad():
        q = model.rotate(torch.as_tensor(xq[:20]))
        c, r, _ = model.quantize(model.rotate(torch.as_tensor(xb)))
        s = model.score(q, c + r).numpy()
    np.testing.assert_allclose(np.take_along_axis(s, I, 1), D, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M,temperature", [(4, 0.05), (8, 0.05), (8, 0.005)])
def test_fused_pq_assignment_equals_autograd(setup, M, temperature):
    """The hand-fused straight-through PQ assignment (_PQStraightThrough) gives the codes,
    values and gradients of the autograd chain it replaces (still used when the balance term
    needs the logits). At 0.005 most rows' largest logit is below -30: their maxima are
    subtracted before the exponential."""
    xb, _, _, _ = setup
    rng = np.random.default_rng(2)
    d = xb.shape[1]
    params = Params(QuantizerSpec(Quantizer.PQ, True, True, M, 5), xb[:16].copy(),
                    rng.standard_normal((M, 32, d // M)).astype(np.float32) * 0.1,
                    np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32))
    x = torch.as_tensor(xb[:500])
    weights = torch.as_tensor(rng.standard_normal((500, d)).astype(np.float32))
    got = []
    for with_logits in (False, True):
        model = Student(params, "ip", soft_temperature=temperature)
        with torch.no_grad():
            model.skew.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
        xr = x.clone().requires_grad_(True)
        c, r, codes = model.quantize(model.rotate(xr), with_logits=with_logits)[:3]
        ((c + r) * weights).sum().add((r * r).sum()).backward()
        got.append([r.detach(), codes, xr.grad, model.codebooks.grad, model.centroids.grad,
                    model.skew.grad])
    fused, chain = got
    assert torch.equal(fused[1], chain[1])
    for a, b in zip(fused[:1] + fused[2:], chain[:1] + chain[2:]):
        assert b.abs().sum() > 0
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * b.abs().max())


def test_rotation_stays_orthogonal_and_loss_falls(setup):
    xb, xq, trained, V = setup
    cfg = loop.Recipe(TrainConfig(batch_size=50, rotation_lr=1e-2, epochs=3),
                      negatives=NegativesConfig(corpus=64))
    model = Student(build.extract_params(trained), "ip")
    loop.calibrate(model, xb[:2000])
    opt = loop.make_optimizer(model, cfg.train)
    data = loop.TrainData(xq, V, xb[:2000])
    losses = [loop.train_epoch(model, opt, data, cfg, e)["loss"] for e in range(cfg.train.epochs)]
    assert losses[-1] < losses[0]
    R = model.rotation().detach()
    np.testing.assert_allclose((R @ R.T).numpy(), np.eye(32), atol=1e-4)
    assert not torch.allclose(R, model.rotation0), "the rotation was learned"


def test_cosine_schedule_scales_the_backed_off_rates(setup):
    """train.lr_schedule=cosine: the full rates at the start, half at mid-training, zero at the
    end, always of the base rate, which the backoff shrinks; constant leaves the base rate."""
    _, _, trained, _ = setup
    model = Student(build.extract_params(trained), "ip")
    opt = loop.make_optimizer(model, TrainConfig(lr=0.05, rotation_lr=1e-4))
    base = [g["lr"] for g in opt.param_groups]
    for progress, factor in ((0.0, 1.0), (0.5, 0.5), (1.0, 0.0)):
        loop.schedule(opt, "cosine", progress)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base])
    for g in opt.param_groups:
        g["base_lr"] *= 0.5
    loop.schedule(opt, "constant", 0.7)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.5 for b in base])


def test_kl_is_zero_when_student_matches_teacher():
    t = torch.tensor([[3.0, 1.0, -torch.inf, 0.5]])
    lists = ListLosses(t, 0.5, 0.5, 2)
    assert lists.kl(torch.tensor([[3.0, 1.0, 7.0, 0.5]])).item() == pytest.approx(0, abs=1e-6)
    assert lists.kl(torch.tensor([[0.0, 3.0, 9.0, 0.5]])).item() > 0.1


def test_list_losses_match_their_definitions():
    """ListLosses (teacher side computed once, KL by its decomposition) against the losses
    written out query by query: values and gradients, with ignored candidates, a query with
    nothing below its top and one with fewer candidates than the top."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 12, generator=g)
    t[t < -0.8] = -torch.inf
    t[3, 4:] = -torch.inf  # a top of 4 and nothing below it
    t[4, 2:] = -torch.inf  # two candidates for a top of 4
    s = torch.randn(5, 12, generator=g, requires_grad=True)
    lists = ListLosses(t, 0.5, 1.3, 4)
    kl_ref, rank_ref = torch.zeros(()), torch.zeros(())
    for i in range(5):
        keep = torch.isfinite(t[i])
        ti, si = t[i][keep], s[i][keep]
        spread = ti.std(unbiased=False)
        log_pt = torch.log_softmax(ti / (1.3 * spread), 0)
        log_ps = torch.log_softmax(si / (1.3 * spread), 0)
        kl_ref = kl_ref + (log_pt.exp() * (log_pt - log_ps)).sum()
        order = si[ti.argsort(descending=True)] / (0.5 * spread)
        rank_ref = rank_ref + sum(torch.logsumexp(order[j:], 0) - order[j]
                                  for j in range(min(4, len(order))))
    for got, want in ((lists.kl(s), kl_ref), (lists.ranking(s), rank_ref)):
        grad = torch.autograd.grad(got, s)[0]
        grad_ref = torch.autograd.grad(want, s, retain_graph=True)[0]
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
        assert grad[~torch.isfinite(t)].abs().max() == 0  # ignored candidates get nothing


def test_weighted_candidates_count_as_repeated_ones():
    """A candidate of weight w (log_weight = log w) counts as w copies of itself: ListLosses
    on a weighted list equals ListLosses on the list with every candidate repeated, values and
    gradients (the copies' gradients summed), with ignored candidates among the weighted."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 10, generator=g)
    t[t < -1.0] = -torch.inf
    w = torch.randint(1, 4, (4, 10), generator=g)
    w.scatter_(1, t.topk(3, 1).indices, 1)  # the teacher's top stands for itself
    s = torch.randn(4, 10, generator=g, requires_grad=True)
    weighted = ListLosses(t, 0.5, 1.3, 3, w.float().log())
    # the repeated lists, padded with ignored candidates to a common length
    width = int(w.sum(1).max())
    cols = torch.zeros(4, width, dtype=torch.long)
    t_rep = torch.full((4, width), -torch.inf)
    for i in range(4):
        idx = torch.arange(10).repeat_interleave(w[i])
        cols[i, :len(idx)], t_rep[i, :len(idx)] = idx, t[i, idx]
    repeated = ListLosses(t_rep, 0.5, 1.3, 3)
    s_rep = s.gather(1, cols)
    for got, want in ((weighted.kl(s), repeated.kl(s_rep)),
                      (weighted.ranking(s), repeated.ranking(s_rep))):
        grad = torch.autograd.grad(got, s)[0]
        grad_ref = torch.autograd.grad(want, s, retain_graph=True)[0]
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(weighted.kl(s), ListLosses(t, 0.5, 1.3, 3).kl(s))


def test_band_weights_reach_both_distillation_terms(setup):
    """batch_loss's slot weights: a neighbour slot of weight 3 scores as the same neighbour in
    three slots, in the PQ and the IVF term alike; lists of another width are refused."""
    xb, xq, trained, _ = setup
    cfg = LossConfig(rank_top=4)
    q, neg = torch.as_tensor(xq[:16]), torch.as_tensor(xb[:8])
    # float32 neighbours: the float16 ones can swap ranks 4 and 5 when rescored, and a weighted
    # slot in the top is not a repeated one (the top orders single documents)
    I = knn.block_topk(xq[:16], xb, np.arange(len(xb)), 6, "ip")[1]
    pos = torch.as_tensor(xb[I])
    weights = torch.tensor([1.0, 1, 1, 1, 3, 3])
    repeated = pos[:, torch.arange(6).repeat_interleave(weights.long())]
    model = Student(build.extract_params(trained), "ip")
    got = objective.batch_loss(model, q, pos, neg, cfg, False, None, weights)
    want = objective.batch_loss(model, q, repeated, neg, cfg, False)
    plain = objective.batch_loss(model, q, pos, neg, cfg, False)
    for term in ("pq", "ivf"):
        np.testing.assert_allclose(got[term].item(), want[term].item(), rtol=1e-5)
        assert abs(got[term].item() - plain[term].item()) > 1e-3 * abs(plain[term].item())
    with pytest.raises(ValueError, match="teacher"):
        objective.batch_loss(model, q, pos, neg, cfg, False, None, weights[:5])


def test_copies_of_a_top_neighbour_are_no_candidates(setup):
    """A document of a query's top `rank_top` that reappears among its other candidates (a
    negative here; another query's neighbour in-batch) is left out: the terms equal those
    without the copy. A copy of a neighbour below the top stays a candidate."""
    xb, xq, trained, V = setup
    cfg = LossConfig(rank_top=4)
    model = Student(build.extract_params(trained), "ip")
    q, neg = torch.as_tensor(xq[:1]), torch.as_tensor(xb[:8])
    pos = torch.as_tensor(V[:1].astype(np.float32))
    plain = objective.batch_loss(model, q, pos, neg, cfg, False)
    top_copy = objective.batch_loss(model, q, pos, torch.cat([neg, pos[0, 2:3]]), cfg, False)
    deep_copy = objective.batch_loss(model, q, pos, torch.cat([neg, pos[0, 6:7]]), cfg, False)
    for term in ("pq", "ivf"):
        np.testing.assert_allclose(top_copy[term].item(), plain[term].item(), rtol=1e-6)
        assert abs(deep_copy[term].item() - plain[term].item()) > 1e-3 * abs(plain[term].item())


def test_data_parallel_gradients_sum_to_the_global_batch(setup):
    """Gradients of two equal slices, summed (the all-reduce), equal the one-process gradient
    of the whole global batch: the kernel side of the 2-worker equivalence."""
    xb, xq, trained, V = setup
    cfg = LossConfig()
    params = build.extract_params(trained)
    neg = torch.as_tensor(xb[np.random.default_rng(0).choice(1000, 32, replace=False)])

    def summed_grads(world):
        per_rank = []
        for r in range(world):
            model = Student(params, "ip")
            idx = np.arange(r * 64 // world, (r + 1) * 64 // world)
            q, pos = torch.as_tensor(xq[idx]), torch.as_tensor(V[idx].astype(np.float32))
            parts = objective.batch_loss(model, q, pos, neg, cfg, in_batch=False)
            ((parts["pq"] + parts["ivf"] + 0.5 * parts["recon"]) / 64).backward()
            per_rank.append([p.grad for p in model.parameters() if p.requires_grad])
        return [sum(gs) for gs in zip(*per_rank)]

    for g1, g2 in zip(summed_grads(1), summed_grads(2)):
        # float32 sums over 64 queries in two orders: ~1e-7 apart in absolute terms
        np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-4, atol=1e-6)


def _run_workers(world, fn):
    """fn(rank, gather, reduce) on `world` threads that gather and sum like torch.distributed
    (every worker calls each collective in the same order); their results by rank."""
    barrier, slots, out = threading.Barrier(world), [None] * world, [None] * world

    def gather(rank):
        def call(t):
            slots[rank] = t.clone()
            barrier.wait()
            got = list(slots)
            barrier.wait()
            return got
        return call

    def reduce(rank):
        def call(t):
            t.copy_(sum(gather(rank)(t)))
        return call

    threads = [threading.Thread(target=lambda r=r: out.__setitem__(
        r, fn(r, gather(r), reduce(r)))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("nlist", [256, 4096])
def test_centroid_gradient_is_summed_as_the_rows_a_step_touched(setup, nlist):
    """Three workers' centroid gradients summed as touched rows equal the dense sum on every
    worker, and the numbers each sends are bounded by the batch (the lists its candidates and
    negatives fall in), not by nlist: the same at nlist 256 and 4,096."""
    xb, xq, _, V = setup
    trained = build.train_baseline(xb, IndexConfig(nlist=nlist, M=4, nbits=6, opq=False),
                                   niter=1)
    params, world, b, n_neg = build.extract_params(trained), 3, 8, 16
    grads = []
    for r in range(world):
        model = Student(params, "ip")
        idx = np.arange(r * b, (r + 1) * b)
        neg = torch.as_tensor(xb[np.random.default_rng(r).choice(1000, n_neg, replace=False)])
        parts = objective.batch_loss(model, torch.as_tensor(xq[idx]),
                                     torch.as_tensor(V[idx].astype(np.float32)), neg,
                                     LossConfig(), in_batch=False)
        (parts["pq"] + parts["ivf"]).backward()
        grads.append(model.centroids.grad.clone())
    dense = sum(grads)
    touched = [len(loop.touched_rows(g)) for g in grads]
    assert 0 < max(touched) <= b * V.shape[1] + n_neg  # the lists of its candidates
    mine = [g.clone() for g in grads]
    sent = _run_workers(world, lambda r, gather, reduce: loop.sum_touched_rows(
        mine[r], gather, reduce))
    for g in mine:
        torch.testing.assert_close(g, dense, rtol=1e-6, atol=1e-9)
    assert sent == [1 + max(touched) * (1 + xb.shape[1])] * world
    # as many rows touched as there are: the dense sum goes instead
    full = [torch.randn(8, 4) for _ in range(world)]
    total = sum(full)
    assert _run_workers(world, lambda r, gather, reduce: loop.sum_touched_rows(
        full[r], gather, reduce)) == [32] * world
    for g in full:
        torch.testing.assert_close(g, total)


def test_pool_reassignment_is_split_across_workers(setup):
    """Three workers each assign a third of the pool (counted) and all end with the lists one
    process computes for the whole pool."""
    xb, _, trained, _ = setup
    model, pool = Student(build.extract_params(trained), "ip"), xb[:1000]
    whole = negatives.pool_lists(model, pool, "cpu")
    counted = [0, 0, 0]

    def on(r, gather, reduce):
        share = negatives.Share(r, 3, gather)

        def fn(x):
            counted[r] += len(x)
            return negatives.pool_lists(model, x, "cpu")
        return negatives.shared_rows(fn, pool, share)

    for got in _run_workers(3, on):
        np.testing.assert_array_equal(got, whole)
    assert counted == [333, 333, 334]


POOL_LISTS_RSS = """
import resource, sys
import numpy as np, torch
from pipeline.distributed.tasks import keep_freed_memory
from pipeline.index.params import Params, QuantizerSpec
from pipeline.quant import negatives
from pipeline.quant.model import Student
torch.set_num_threads(1)
rng = np.random.default_rng(0)
nlist, d, P = 4096, 16, 200_000
spec = QuantizerSpec("pq", ivf=True, rotation=False, M=4, nbits=4)
params = Params(spec, rng.standard_normal((nlist, d)).astype("float32"),
                rng.standard_normal((4, 16, d // 4)).astype("float32"), None)
model, pool = Student(params, "ip"), rng.standard_normal((P, d)).astype("float32")
negatives.pool_lists(model, pool[:1000], "cpu")
assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
negatives.pool_lists(model, pool, "cpu")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) << 10)
"""


def test_pool_assignment_memory_does_not_grow_with_the_pool():
    """In a training worker's allocator (tasks.keep_freed_memory, one arena), assigning a pool
    of 200,000 vectors to 4,096 lists takes about one chunk's scores (SCORES_BYTES), not the
    pool x nlist scores (3.3 GB) that chunk results kept between chunks once cost."""
    import subprocess
    import sys
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run([sys.executable, "-c", POOL_LISTS_RSS], env=env, check=True,
                         capture_output=True, text=True).stdout
    grew = int(out.split()[-1])
    assert grew < 4 * negatives.SCORES_BYTES, f"pool assignment grew the process by {grew} B"


@pytest.mark.parametrize("d,dtype", [(16, np.float32), (64, np.float32), (16, np.float64)])
def test_unique_rows_groups_exact_copies(d, dtype):
    """Copies are grouped, a row one ulp away from another is not a copy: by the row keys
    alone (d = 16: every coordinate is keyed) and by the exact fallback (d = 64: the changed
    coordinate is not keyed; float64: keyed by its float32 rounding, so the keys collide)."""
    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.standard_normal((50, d)).astype(dtype))
    assert objective.unique_rows(x)[1] is None
    near = x[7].clone()
    near[3] = torch.nextafter(near[3], torch.tensor(np.inf))  # one ulp away: not a copy
    y = torch.cat([x, x[[7, 7, 20]], near[None]])
    distinct, again = objective.unique_rows(y)
    assert len(distinct) == 51
    torch.testing.assert_close(distinct[again], y, rtol=0, atol=0)


@pytest.mark.parametrize("balance", [0.0, 0.5])
def test_documents_in_several_lists_are_quantized_once(setup, monkeypatch, balance):
    """A document that several lists of the batch hold (a neighbour of two queries, a shared
    negative that is also a neighbour) is quantized once: every term and every gradient are
    those of quantizing each copy on its own."""
    xb, xq, trained, V = setup
    cfg = LossConfig(rank_top=4, balance_weight=balance, recon_weight=0.5)
    idx = np.r_[0:24, 0:8]  # eight queries twice: their whole lists repeat
    q, pos = torch.as_tensor(xq[idx]), torch.as_tensor(V[idx].astype(np.float32))
    neg = torch.cat([torch.as_tensor(xb[:12]), pos[0, 5:6], pos[3, 1:5]])
    assert len(objective.unique_rows(torch.cat([pos.reshape(-1, pos.shape[-1]), neg]))[0]) \
        < len(pos.reshape(-1, pos.shape[-1])) + len(neg)

    def run():
        model = Student(build.extract_params(trained), "ip")
        parts = objective.batch_loss(model, q, pos, neg, cfg, True)
        objective.total_loss(parts, cfg, 1.0).backward()
        return parts, [p.grad for p in model.parameters() if p.requires_grad]

    once, g_once = run()
    monkeypatch.setattr(objective, "unique_rows", lambda x: (x, None))
    each, g_each = run()
    for term in objective.LOSS_TERMS:
        np.testing.assert_allclose(once[term].item(), each[term].item(), rtol=1e-5)
    for a, b in zip(g_once, g_each):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6 * b.abs().max())


@pytest.mark.parametrize("in_batch", [False, True])
def test_empty_teacher_slots_are_no_candidates(setup, in_batch):
    """NaN neighbour vectors (a band's empty slots) score as no candidate at all: the
    distillation terms equal those of the lists without the slot, and no NaN reaches a
    gradient."""
    xb, xq, trained, V = setup
    cfg = LossConfig(rank_top=4)
    neg = torch.as_tensor(xb[:16])
    q = torch.as_tensor(xq[:32])
    pos = torch.as_tensor(V[:32].astype(np.float32))
    holed = pos.clone()
    holed[:, -1] = torch.nan
    model = Student(build.extract_params(trained), "ip")
    want = objective.batch_loss(model, q, pos[:, :-1], neg, cfg, in_batch)
    got = objective.batch_loss(model, q, holed, neg, cfg, in_batch)
    for term in ("pq", "ivf"):
        assert torch.isfinite(got[term])
        np.testing.assert_allclose(got[term].item(), want[term].item(), rtol=1e-5)
    (got["pq"] + got["ivf"] + got["recon"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("nlist", [16, 0])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rq_student_scores_like_the_exported_faiss_index(setup, nlist, metric):
    """The residual (AQ) student's hard forward is what faiss's IndexIVFResidualQuantizer /
    IndexResidualQuantizer, built from the exported codebooks, encodes and scores."""
    xb, xq, _, _ = setup
    icfg = IndexConfig(nlist=nlist, M=3, nbits=5, opq=False, quantizer="rq")
    trained = build.train_baseline(xb[:3000], icfg, niter=5, metric=metric)
    params = build.extract_params(trained)
    assert params.codebooks.shape == (3, 32, 32) and params.spec.kind == "rq"
    model = Student(params, metric)
    index = build.index_from_params(model.export(), metric)
    assert type(index).__name__ == ("IndexIVFResidualQuantizer" if nlist
                                     else "IndexResidualQuantizer")
    index.add(xb)
    build.set_nprobe(index, max(nlist, 1))
    D, I = index.search(xq[:20], 5)
    with torch.no_grad():
        c, r, codes = model.quantize(torch.as_tensor(xb))
        s = model.score(torch.as_tensor(xq[:20]), c + r).numpy()
    want = D if metric == "ip" else -D  # faiss gives L2 as a distance, the student a score
    np.testing.assert_allclose(np.take_along_axis(s, I, 1), want, rtol=1e-4, atol=1e-4)
    # and the faiss baseline encodes exactly as the student does (greedy, beam 1)
    base = faiss.clone_index(trained)
    base.add(xb)
    build.set_nprobe(base, max(nlist, 1))
    assert_same_answers(base.search(xq[:20], 5), (D, I), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nlist", [16, 0])
def test_lsq_student_encodes_jointly_as_faiss_decodes(setup, nlist):
    """The LSQ student's codes: each ICM sweep keeps or lowers every vector's reconstruction
    error from the greedy codes, the codes lower it on the whole, and faiss's
    LocalSearchQuantizer of the exported index decodes them to the student's reconstruction
    (the same codebooks, in the same layout). faiss encodes what is added with its own,
    stronger search: its error is no higher than the student's."""
    xb, _, _, _ = setup
    icfg = IndexConfig(nlist=nlist, M=4, nbits=8, opq=False, quantizer="lsq")
    params = build.extract_params(build.train_baseline(xb[:3000], icfg, niter=5))
    assert params.codebooks.shape == (4, 256, 32) and params.spec.kind == "lsq"
    model = Student(params, "ip")
    x = torch.as_tensor(xb[:2000])
    with torch.no_grad():
        c, r_hat, codes = model.quantize(x)
        r = x - c
        errors = []
        for sweeps in range(4):
            got = model._icm_codes(r, model.codebooks, sweeps)
            rec = sum(model.codebooks[m][got[:, m]] for m in range(4))
            errors.append(((r - rec) ** 2).sum(1))
    for before, after in zip(errors, errors[1:]):
        assert (after <= before + 1e-5).all()
    assert errors[-1].mean() < 0.99 * errors[0].mean()
    index = build.index_from_params(model.export(), "ip")
    assert type(index).__name__ == ("IndexIVFLocalSearchQuantizer" if nlist
                                     else "IndexLocalSearchQuantizer")
    lsq = build.ivfpq_of(index).lsq if nlist else index.lsq
    decoded = lsq.decode(codes.numpy().astype(np.uint8))
    np.testing.assert_allclose(decoded, r_hat.numpy(), rtol=1e-5, atol=1e-5)
    theirs = lsq.decode(lsq.compute_codes(np.ascontiguousarray(r.numpy())))
    assert ((r.numpy() - theirs) ** 2).sum(1).mean() <= \
        ((r - r_hat) ** 2).sum(1).mean().item() * 1.001


@pytest.mark.parametrize("quantizer", ["rq", "lsq"])
def test_additive_student_learns_and_exports_the_learned_codebooks(setup, quantizer):
    xb, xq, _, V = setup
    icfg = IndexConfig(nlist=16, M=4, nbits=5, opq=False, quantizer=quantizer)
    params = build.extract_params(build.train_baseline(xb[:3000], icfg, niter=5))
    cfg = loop.Recipe(TrainConfig(batch_size=50, epochs=2), negatives=NegativesConfig(corpus=64),
                      loss=LossConfig(kind="ranking", balance_weight=0.1))
    model = Student(params, "ip")
    loop.calibrate(model, xb[:2000])
    opt = loop.make_optimizer(model, cfg.train)
    data = loop.TrainData(xq, V, xb[:2000])
    losses = [loop.train_epoch(model, opt, data, cfg, e)["loss_pq"] for e in range(2)]
    assert losses[-1] < losses[0]
    out = model.export()
    assert not np.allclose(out.codebooks, params.codebooks)
    index = build.index_from_params(out, "ip")
    aq = getattr(build.ivfpq_of(index), quantizer)
    np.testing.assert_array_equal(faiss.vector_to_array(aq.codebooks), out.codebooks.ravel())


def test_ranking_loss_prefers_the_teacher_order():
    t = torch.tensor([[4.0, 3.0, 2.0, 1.0, -torch.inf]])
    lists = ListLosses(t, 1.0, 1.0, 3)
    lists.tau = torch.ones(1, 1)  # scores as they are, for the hand computation
    same = lists.ranking(torch.tensor([[4.0, 3.0, 2.0, 1.0, 9.0]]))
    swapped = lists.ranking(torch.tensor([[3.0, 4.0, 2.0, 1.0, 9.0]]))
    sharper = lists.ranking(torch.tensor([[40.0, 30.0, 20.0, 10.0, 9.0]]))
    assert sharper < same < swapped  # the ignored candidate (9.0) plays no part
    assert sharper.item() == pytest.approx(0, abs=1e-3)
    # by hand: position 0: logsumexp(4,3,2,1) - 4, and so on
    hand = sum(torch.logsumexp(torch.tensor([4.0, 3.0, 2.0, 1.0])[i:], 0) - (4.0 - i)
               for i in range(3))
    assert same.item() == pytest.approx(hand.item(), rel=1e-5)


def test_sinkhorn_plan_balances_codewords():
    logits = torch.randn(600, 8) + torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 0])  # codeword 0 wins
    plan = sinkhorn_plan(logits, 50)
    np.testing.assert_allclose(plan.sum(1).numpy(), 1, rtol=1e-4)
    np.testing.assert_allclose(plan.sum(0).numpy(), 600 / 8, rtol=1e-2)
    assert torch.softmax(logits, 1).sum(0)[0] > 300  # unbalanced before
    # the balance term pushes mass off the crowded codeword
    lg = logits.clone().requires_grad_(True)
    sinkhorn_balance(lg, 10).backward()
    assert lg.grad[:, 0].sum() > 0


def test_contrastive_term_rewards_the_labeled_document():
    cand = torch.tensor([[1.0, 0.5, 0.0]])
    lists = ListLosses(cand, 1.0, 1.0, 1)
    assert lists.contrastive(torch.tensor([3.0]), cand) < lists.contrastive(torch.tensor([0.0]),
                                                                           cand)
    # and through the kernel: labeled vectors add a term only when its weight is > 0
    rng = np.random.default_rng(0)
    params = Params(QuantizerSpec(Quantizer.PQ, ivf=True, rotation=False, M=2, nbits=4),
                    normalized(rng, 4, 8), rng.standard_normal((2, 16, 4)).astype(np.float32))
    q, pos = torch.as_tensor(normalized(rng, 6, 8)), torch.as_tensor(
        normalized(rng, 18, 8).reshape(6, 3, 8))
    lab, neg = pos[:, 0].clone(), torch.as_tensor(normalized(rng, 10, 8))
    off = objective.batch_loss(Student(params), q, pos, neg, LossConfig(), True, lab)
    on = objective.batch_loss(Student(params), q, pos, neg, LossConfig(contrastive_weight=1.0),
                              True, lab)
    assert off["contrastive"].item() == 0 and on["contrastive"].item() > 0
    assert on["pq"].item() == pytest.approx(off["pq"].item())


def test_ivf_negatives_come_from_the_probed_lists(setup):
    xb, xq, trained, _ = setup
    model = Student(build.extract_params(trained), "ip")
    pool = xb[:3000]
    cfg = NegativesConfig(corpus=100, sampler="ivf", ivf_nprobe=1)
    sampler = negatives.NegativeSampler(pool, cfg, 0)
    sampler.start_epoch(model, "cpu")
    batch = xq[:4]
    neg = sampler.draw(model, batch, 0, 0, "cpu")
    again = sampler.draw(model, batch, 0, 0, "cpu")
    np.testing.assert_array_equal(neg, again)  # every worker draws the same
    with torch.no_grad():
        probed = set(model.assign(model.rotate(torch.as_tensor(batch))).tolist())
        got = model.assign(model.rotate(torch.as_tensor(neg))).tolist()
    near = int(np.isin(sampler.lists, list(probed)).sum())
    assert sum(g in probed for g in got) == min(100, near)
    rand = negatives.NegativeSampler(pool, NegativesConfig(corpus=100), 0).draw(
        model, batch, 0, 0, "cpu")
    with torch.no_grad():
        got_r = model.assign(model.rotate(torch.as_tensor(rand))).tolist()
    assert sum(g in probed for g in got_r) < sum(g in probed for g in got)


def test_list_negatives_come_from_each_querys_own_list(setup):
    """Each query's list negatives lie in the list it probes first; copies of its top
    neighbours (and the query itself, were it a pool vector) are left out as empty slots; a
    query draws the same wherever it sits in whichever worker's share of the batch."""
    xb, xq, trained, V = setup
    model = Student(build.extract_params(trained), "ip")
    # the last query is a pool vector, which the pool holds 200 times over
    pool = np.concatenate([xb[:3000], np.repeat(xb[:1], 200, 0)])
    near = negatives.ListNegatives(pool, 40, 3)
    q = torch.as_tensor(np.concatenate([xq[:7], xb[:1]]))
    I = knn.block_topk(q.numpy(), pool, np.arange(len(pool)), 4, "ip")[1]
    pos = torch.as_tensor(pool[I])
    got = near.draw(model, q, pos, 4, 0, 0)
    assert got.shape == (8, 40, 32)
    with torch.no_grad():
        own = model.assign(model.rotate(q))
        filled = torch.isfinite(got).all(-1)
        lists = model.assign(model.rotate(got[filled]))
    assert (lists == own[:, None].expand(-1, 40)[filled]).all()
    # what is left out is exactly what scores at or above the 4th neighbour
    s = torch.einsum("bd,bnd->bn", q, torch.nan_to_num(got))
    assert (s[filled] < (q * pos[:, 3]).sum(1)[:, None].expand(-1, 40)[filled]).all()
    assert filled[:-1].sum() > 0.9 * 7 * 40
    assert 0 < filled[-1].sum() < 30  # about half its list is copies of it
    again = negatives.ListNegatives(pool, 40, 3)
    halves = [again.draw(model, q[i::2], pos[i::2], 4, 0, 0) for i in (1, 0)]
    torch.testing.assert_close(torch.cat(halves)[[4, 0, 5, 1, 6, 2, 7, 3]], got,
                               equal_nan=True)
    other = negatives.ListNegatives(pool, 40, 3).draw(model, q, pos, 4, 0, 1)
    assert not torch.equal(torch.nan_to_num(other), torch.nan_to_num(got))  # a new step


@pytest.mark.parametrize("c", [128.0, 1 / 128])  # powers of two: exact scalings
def test_training_is_scale_free(setup, c):
    """Data c times larger or smaller (raw SIFT-like magnitudes instead of unit norms) trains
    the same student, c times larger: learning rates are in units of the warm start's error,
    and every temperature is relative to the data."""
    xb, xq, trained, V = setup
    # ivf_weight 1.0: with this tiny set and the default 0.3, some codewords sit on near-ties
    # that float rounding tips differently at the two scales (1.2% of the codebook entries
    # drift by up to 1.7e-3); the other pairs of kl_temperature 1 or 2 and ivf_weight 1.0 or
    # 0.3 pass.
    cfg = loop.Recipe(TrainConfig(batch_size=50, epochs=1), negatives=NegativesConfig(corpus=64),
                      loss=LossConfig(balance_weight=0.1, recon_weight=0.1, ivf_weight=1.0))
    params = build.extract_params(trained)
    out = []
    for scale in (1.0, c):
        p = dataclasses.replace(params, centroids=params.centroids * scale,
                                codebooks=params.codebooks * scale)
        model = Student(p, "ip")
        loop.calibrate(model, xb[:2000] * scale)
        opt = loop.make_optimizer(model, cfg.train)
        data = loop.TrainData(xq * scale, V.astype(np.float32) * scale, xb[:2000] * scale)
        loop.train_epoch(model, opt, data, cfg, 0)
        out.append(model.export())
    assert not np.allclose(out[0].codebooks, params.codebooks, atol=1e-3), "it learned"
    # A power of two scales every float exactly, and every constant of training (learning
    # rates, temperatures, Adam's epsilon) is in units of the data, so the two runs agree to
    # the last bit (measured: a largest difference of 0). Anything that did not scale
    # tips near-tie codeword assignments: a fixed Adam epsilon moved 18% of the centroids by
    # more than 1e-4.
    for key in ("centroids", "codebooks"):
        np.testing.assert_allclose(getattr(out[1], key) / c, getattr(out[0], key), rtol=0,
                                   atol=1e-6, err_msg=key)
    np.testing.assert_allclose(out[1].rotation, out[0].rotation, rtol=0, atol=1e-4)


def test_validation_backs_off_and_keeps_the_best():
    """Steps far too large make validation fall: the trainer goes back to the best student
    and shrinks the learning rates (train.lr_backoff), or with a backoff of 1 keeps going at
    the same rates. Either way it keeps the student that validated best."""
    rng = np.random.default_rng(3)
    xb, xq = normalized(rng, 4000, 32), normalized(rng, 500, 32)
    trained = build.train_baseline(xb, IndexConfig(nlist=16, M=4, nbits=6, opq=True), niter=5)
    V = knn.block_topk(xq, xb, np.arange(len(xb)), 8, "ip", with_vectors=True)[2]
    data, val = loop.TrainData(xq[50:], V[50:], xb), loop.TrainData(xq[:50], V[:50], xb)
    check = fit.IndexValidator(val, "ip")
    model = Student(build.extract_params(trained))
    loop.calibrate(model, xb[:4096])  # as fit does: lr is in units of model.step_unit
    for backoff in (0.5, 1):
        cfg = load_config(None, ["data.corpus=/x", "train.lr=6", "train.rotation_lr=0.1",
                                 "train.epochs=2", "train.batch_size=50", "train.val_checks=3",
                                 f"train.lr_backoff={backoff}", "teacher.k=8",
                                 "teacher.band_depth=0", "teacher.band_size=0"])
        state = fit.fit(build.extract_params(trained), data, val, cfg)
        lrs = [h["lr"] for h in state["history"]]
        lr = 6 * model.step_unit
        if backoff < 1:
            assert state["backoffs"] >= 1
            assert lrs[-1] == pytest.approx(lr * 0.5 ** state["backoffs"])
        else:
            assert state["backoffs"] == 0 and lrs == pytest.approx([lr, lr])
        kept = fit.build_student(state["best"], cfg)
        assert check(kept).mean() == pytest.approx(state["best_val"])


def test_only_a_significant_fall_backs_off():
    """The backoff's test is paired over the same queries: a fall that per-query noise
    explains does not count, a consistent one does, and with z = 0 any fall does."""
    rng = np.random.default_rng(0)
    best = rng.integers(1, 10, 2000) / 10
    # 1,020 queries lose a tenth, 980 gain one: a mean fall of 0.002, 0.9 standard errors
    noisy = best + rng.permutation(np.repeat([-0.1, 0.1], [1020, 980]))
    assert noisy.mean() < best.mean()
    assert not fit.significant_fall(best, noisy, 2.0)
    assert fit.significant_fall(best, noisy, 0.0)
    worse = best - rng.permutation(np.repeat([0.1, 0.0], [300, 1700]))  # 15% lose a tenth
    assert fit.significant_fall(best, worse, 2.0)
    assert not fit.significant_fall(best, best.copy(), 0.0)
    assert not fit.significant_fall(best, best + 0.1, 2.0)


def test_validation_ground_truth_comes_from_the_pool_it_searches():
    """With `pool_size` smaller than the sample, validation searches an index over the first
    pool_size vectors, so its exact top-k must come from those same vectors: a validator
    over a bounded pool agrees with one given only that pool, and its top-k ids stay in it."""
    rng = np.random.default_rng(5)
    xb, xq = normalized(rng, 3000, 16), normalized(rng, 200, 16)
    trained = build.train_baseline(xb, IndexConfig(nlist=8, M=4, nbits=6, opq=False), niter=5)
    V = knn.block_topk(xq, xb, np.arange(len(xb)), 8, "ip", with_vectors=True)[2]
    bounded = fit.IndexValidator(loop.TrainData(xq, V, xb), "ip", pool_size=1000)
    alone = fit.IndexValidator(loop.TrainData(xq, V, xb[:1000]), "ip")
    assert bounded.gt.max() < 1000
    np.testing.assert_array_equal(bounded.gt, alone.gt)
    model = Student(build.extract_params(trained))
    np.testing.assert_array_equal(bounded(model), alone(model))


@pytest.mark.parametrize("quantizer", ["pq", "rq"])
def test_the_training_kernel_keeps_every_tensor_on_the_models_device(quantizer):
    """fit on a device (tests/device_double.py: CUDA's rules, kept on the CPU): calibration,
    the warm-start validation, negatives, steps and checkpoints never hand the model a CPU
    tensor nor read a device tensor as numpy; and the student it trains is the one the CPU
    trains (the device changes no arithmetic here)."""
    from .device_double import DeviceMix, OnDevice

    rng = np.random.default_rng(2)
    xb, xq = normalized(rng, 2000, 16), normalized(rng, 160, 16)
    cfg_index = IndexConfig(nlist=8, M=4, nbits=4, opq=quantizer == "pq", quantizer=quantizer)
    trained = build.train_baseline(xb, cfg_index, niter=4)
    V = knn.block_topk(xq, xb, np.arange(len(xb)), 8, "ip", with_vectors=True)[2]
    data, val = loop.TrainData(xq[40:], V[40:], xb), loop.TrainData(xq[:40], V[:40], xb)
    cfg = load_config(None, ["data.corpus=/x", "train.epochs=1", "train.batch_size=40",
                             "teacher.k=8", "teacher.band_depth=0", "teacher.band_size=0",
                             f"index.quantizer={quantizer}", "index.M=4", "index.nbits=4",
                             f"index.opq={str(quantizer == 'pq').lower()}"])
    params = build.extract_params(trained)
    on_cpu = fit.fit(params, data, val, cfg)
    with OnDevice():
        on_device = fit.fit(params, data, val, cfg, device=OnDevice.DEVICE)
    for key in ("centroids", "codebooks"):
        np.testing.assert_allclose(getattr(on_device["best"], key), getattr(on_cpu["best"], key),
                                   rtol=0, atol=1e-5, err_msg=key)
    # the double does catch what a GPU refuses
    with OnDevice(), pytest.raises(DeviceMix):
        model = fit.build_student(params, cfg).to(OnDevice.DEVICE)
        model.coarse_scores(torch.as_tensor(xb[:10]))  # a CPU batch, as calibration had
