"""faiss layer: exact kNN merge, parameter export, on-disk merge of shards."""
import dataclasses
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from pipeline.config import IndexConfig
from pipeline.index import build, gpu, knn, metrics, ondisk

from .answers import assert_same_answers
from .conftest import normalized


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return normalized(rng, 12000, 32), normalized(rng, 64, 32)


@pytest.fixture(scope="module")
def trained(data):
    return build.train_baseline(data[0], IndexConfig(nlist=16, M=4, nbits=6, opq=True), niter=5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_topk_equals_brute_force(data, metric):
    xb, xq = data
    ids = np.arange(len(xb)) * 7 + 3
    parts = [knn.block_topk(xq, xb[a:a + 3000], ids[a:a + 3000], 10, metric, True)
             for a in range(0, len(xb), 3000)]
    S, I, V = knn.merge_topk(parts, 10)
    sim = xq @ xb.T if metric == "ip" else -((xq[:, None] - xb[None]) ** 2).sum(-1)
    ref = np.argsort(-sim, axis=1)[:, :10]
    assert_same_answers((S, I), (np.take_along_axis(sim, ref, 1), ids[ref]), atol=1e-5)
    np.testing.assert_allclose(V.astype(np.float32), xb[(I - 3) // 7], atol=1e-3)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_gemm_search_equals_faiss(data, metric):
    """The GPU route (torch GEMM + top-k), run here on the CPU, finds faiss's neighbours."""
    xb, xq = data
    index = faiss.IndexFlatIP(32) if metric == "ip" else faiss.IndexFlatL2(32)
    index.add(xb)
    D_ref, I_ref = index.search(xq, 10)
    assert_same_answers(knn._torch_search(xb, metric, "cpu")(xq, 10), (D_ref, I_ref),
                        rtol=0, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_band_draws_the_same_over_shards_as_over_the_corpus(data, metric):
    """The top k, then the neighbours of ranks k+1..depth whose (query, document) key falls
    below the rate, in rank order: per shard and merged in a tree, exactly what one search
    over the whole corpus draws, and that draw is the definition's, vectors included."""
    xb, xq = data
    ids = np.arange(len(xb)) * 7 + 3
    qids = np.arange(len(xq)) + 500
    band = knn.Band(10, 300, 20, seed=4)
    whole = knn.finish(knn.block_topk(xq, xb, ids, 10, metric, True, band=band, qids=qids), band)
    parts = [knn.block_topk(xq, xb[a:a + 2500], ids[a:a + 2500], 10, metric, True, band=band,
                            qids=qids) for a in range(0, len(xb), 2500)]
    tree = knn.merge_topk([knn.merge_topk(parts[:2], 10, band)] + parts[2:], 10, band)
    S, I, V = knn.finish(tree, band)
    assert I.shape == (len(xq), 10 + band.width) and V.shape == I.shape + (32,)
    for a, b in zip(whole, (S, I, V)):
        np.testing.assert_array_equal(a, b)

    Sf, If, _ = knn.block_topk(xq, xb, ids, 300, metric)
    keys = band.keys(qids, If)
    drawn = []
    for r in range(len(xq)):
        want = [i for j, i in enumerate(If[r]) if j >= 10 and keys[r, j] < band.rate]
        got = [i for i in I[r, 10:] if i >= 0]
        if len(want) <= band.width:
            assert got == want
        else:  # overflow keeps the smallest keys, in rank order
            rank = {i: j for j, i in enumerate(If[r])}
            assert got == sorted(sorted(want, key=lambda i: keys[r, rank[i]])[:band.width],
                                 key=rank.get)
        drawn.append(len(got))
        np.testing.assert_array_equal(I[r, :10], If[r, :10])
    assert 15 < np.mean(drawn) < 25  # about band.size per query
    row = (I[I >= 0] - 3) // 7
    np.testing.assert_allclose(V[I >= 0].astype(np.float32), xb[row], atol=1e-3)
    assert np.isnan(V[I < 0]).all() and np.isneginf(S[I < 0]).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_pseudo_queries_do_not_find_themselves(data, metric):
    """exclude_self: corpus samples as queries get what a search over the corpus with the
    sample taken out gets, over shards (the row lies in one of them) and with a band alike.
    Of two rows with the query's vector only one goes: the other is a neighbour like any."""
    xb, _ = data
    xb = xb.copy()
    ids = np.arange(len(xb)) * 7 + 3
    rows = np.array([5, 700, 4000, 9000, 11999])
    xb[1234] = xb[700]
    band = knn.Band(10, 300, 20, seed=4)
    for b in (None, band):
        S, I, V = knn.finish(knn.merge_topk(
            [knn.block_topk(xb[rows], xb[a:a + 3000], ids[a:a + 3000], 10, metric, True,
                            band=b, qids=rows, exclude_self=True)
             for a in range(0, len(xb), 3000)], 10, b), b)
        for r, row in enumerate(rows):
            keep = np.delete(np.arange(len(xb)), row)
            want = knn.finish(knn.block_topk(xb[row:row + 1], xb[keep], ids[keep], 10, metric,
                                             True, band=b, qids=rows[r:r + 1]), b)
            got = np.where(I[r] == ids[700], ids[1234], I[r])  # the copies are one document
            np.testing.assert_array_equal(got, want[1][0])
            np.testing.assert_allclose(S[r], want[0][0], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(V[r], want[2][0])
            assert (row == 700) or ids[row] not in I[r]
        assert (ids[700] in I[1]) != (ids[1234] in I[1])  # one copy of query 700 is left


def test_band_is_refused_where_it_cannot_draw():
    with pytest.raises(ValueError, match="needs 0 < size < depth - k"):
        knn.Band(10, 25, 20)


def test_topk_pads_small_shards(data):
    xb, xq = data
    S, I, V = knn.block_topk(xq, xb[:3], np.arange(3), 5, "ip", True)
    assert (I[:, 3:] == -1).all() and np.isneginf(S[:, 3:]).all()
    assert np.isnan(V[:, 3:]).all() and np.isfinite(V[:, :3]).all()


def test_params_round_trip(data, trained):
    xb, xq = data
    rebuilt = build.index_from_params(build.extract_params(trained), "ip")
    a = ondisk.encode_shard(trained, np.arange(len(xb)), xb)
    b = ondisk.encode_shard(rebuilt, np.arange(len(xb)), xb)
    for index in (a, b):
        build.set_nprobe(index, 4)
    assert_same_answers(a.search(xq, 10), b.search(xq, 10))


@pytest.fixture(scope="module")
def trained_rq(data):
    return build.train_baseline(
        data[0][:4000], IndexConfig(nlist=16, M=3, nbits=6, opq=False, quantizer="rq"), niter=5)


@pytest.fixture(scope="module")
def trained_lsq(data):
    return build.train_baseline(
        data[0][:4000], IndexConfig(nlist=16, M=4, nbits=6, opq=False, quantizer="lsq"), niter=5)


@pytest.mark.parametrize("structure", ["trained", "trained_rq", "trained_lsq"])
def test_ondisk_merge_equals_single_index(data, structure, tmp_path, request):
    """IVF-OPQ-PQ, IVF-RQ and IVF-LSQ (the additive students' exports) merge on disk alike."""
    xb, xq = data
    trained = request.getfixturevalue(structure)
    ids = np.arange(len(xb)) + 1000
    # The single index adds the shards' vectors in the same slices: faiss's LSQ encoder draws
    # its random restarts per call, so a vector's LSQ code depends on the batch it came in
    # (PQ and RQ codes do not).
    single = faiss.clone_index(trained)
    slices = [slice(s * 3000, (s + 1) * 3000) for s in range(4)]
    for sl in slices:
        single.add_with_ids(xb[sl], ids[sl])
    paths = []
    for s, sl in enumerate(slices):
        p = str(tmp_path / f"s{s}.index")
        faiss.write_index(ondisk.encode_shard(trained, ids[sl], xb[sl]), p)
        paths.append(p)
    out = tmp_path / "out"
    out.mkdir()
    index_path, ivfdata, n = ondisk.merge_ondisk(trained, paths, str(out))
    assert n == len(xb) and os.path.exists(ivfdata)
    merged = ondisk.read_ondisk(index_path)
    for index in (single, merged):
        build.set_nprobe(index, 8)
    Ds, Is = single.search(xq, 20)
    assert_same_answers(merged.search(xq, 20), (Ds, Is))
    # A process that imports nothing of ours opens it with plain faiss and gets the same answer.
    np.save(tmp_path / "xq.npy", xq)
    code = ("import faiss, numpy as np, sys; ix = faiss.read_index(sys.argv[1]); "
            "faiss.extract_index_ivf(ix).nprobe = 8; "
            "print(ix.ntotal); np.save(sys.argv[3], np.stack(ix.search(np.load(sys.argv[2]), 20)))")
    res = subprocess.run([sys.executable, "-c", code, index_path, str(tmp_path / "xq.npy"),
                          str(tmp_path / "I.npy")], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == str(len(xb))
    D, I = np.load(tmp_path / "I.npy")
    assert_same_answers((D, I.astype(np.int64)), (Ds, Is))


def test_metrics():
    gt = np.array([[1, 2, 3], [4, 5, 6]])
    I = np.array([[3, 9, 1], [7, 8, 9]])
    assert metrics.overlap_recall(I, gt, 3) == pytest.approx(2 / 6)
    qrels = {0: {9}, 1: {4}}
    assert metrics.mrr_at(I, np.array([0, 1]), qrels, 3) == pytest.approx(0.25)
    assert metrics.label_recall_at(I, np.array([0, 1]), qrels, 3) == pytest.approx(0.5)


def test_check_shape_names_the_fix():
    with pytest.raises(ValueError, match="does not divide"):
        build.check_shape(IndexConfig(M=7), 32, 10000)
    with pytest.raises(ValueError, match="fewer than"):
        build.check_shape(IndexConfig(nlist=256, M=4), 32, 100)


def test_gpu_kmeans_request_is_the_cpu_result_without_gpus(data, trained):
    """use_gpu asks faiss-gpu for the coarse k-means; a faiss without GPUs (this machine's)
    trains exactly as on the CPU instead of failing."""
    if gpu.gpu_count():
        pytest.skip("this faiss has GPUs: the GPU k-means runs (checked on a GPU machine)")
    cfg = IndexConfig(nlist=16, M=4, nbits=6, opq=True)
    got = build.train_baseline(data[0], cfg, niter=5, use_gpu=True)
    assert faiss.serialize_index(got).tobytes() == faiss.serialize_index(trained).tobytes()


def test_fastscan_export_answers_as_the_float_index(tmp_path):
    """A 4-bit IVF-OPQ, exported as IndexIVFPQFastScan behind its rotation, keeps its
    centroids and codebooks: its answers match the float look-up tables' except where the
    8-bit quantized tables break near-ties, and plain faiss reads it back."""
    x = normalized(np.random.default_rng(5), 2000, 32)
    trained = build.train_baseline(x, IndexConfig(nlist=16, M=8, nbits=4, opq=True),
                                     niter=10)
    fs = build.to_fastscan(trained)
    for index in (trained, fs):
        index.add(x)
        build.set_nprobe(index, 4)
    want, got = trained.search(x[:300], 10)[1], fs.search(x[:300], 10)
    assert metrics.overlap_recall(got[1], want, 10) > 0.95
    faiss.write_index(fs, str(tmp_path / "fs.index"))
    back = faiss.read_index(str(tmp_path / "fs.index"))
    assert isinstance(faiss.downcast_index(build._inner(back)), faiss.IndexIVFPQFastScan)
    assert_same_answers(back.search(x[:300], 10), got)
    with pytest.raises(ValueError, match="4-bit"):
        build.to_fastscan(faiss.index_factory(32, "IVF16,PQ8", faiss.METRIC_INNER_PRODUCT))


def test_fastscan_from_merged_ondisk_lists_outlives_its_source(tmp_path):
    """The pipeline's export: the merged on-disk 4-bit index, converted with its codes and
    ids; the fast-scan index keeps answering after the on-disk one is closed, and gives the
    same answers as the same vectors added to a fast-scan index directly."""
    rng = np.random.default_rng(6)
    x = normalized(rng, 3000, 32)
    trained = build.train_baseline(x, IndexConfig(nlist=16, M=8, nbits=4, opq=True),
                                     niter=10)
    ids = np.arange(3000, dtype=np.int64) * 7 + 11
    paths = []
    for s, (a, b) in enumerate([(0, 1400), (1400, 3000)]):
        shard = ondisk.encode_shard(trained, ids[a:b], x[a:b])
        paths.append(str(tmp_path / f"s{s}.index"))
        faiss.write_index(shard, paths[-1])
    os.makedirs(tmp_path / "merged")
    index_path, _, n = ondisk.merge_ondisk(trained, paths, str(tmp_path / "merged"))
    merged = ondisk.read_ondisk(index_path)
    fs = build.to_fastscan(merged)
    del merged
    direct = build.to_fastscan(trained)
    direct.add_with_ids(x, ids)
    for index in (fs, direct):
        build.set_nprobe(index, 4)
    assert fs.ntotal == n == 3000
    got, want = fs.search(x[:200], 10), direct.search(x[:200], 10)
    assert_same_answers(got, want)


def test_an_hnsw_coarse_quantizer_assigns_as_the_flat_one_does(tmp_path):
    """index.coarse=hnsw: the trained index (baseline or exported from parameters) carries an
    HNSW32 graph over the same centroids, survives a round trip through a plain faiss file,
    and puts almost every vector in the list the exact quantizer picks."""
    from pipeline.config import Coarse

    rng = np.random.default_rng(3)
    x = normalized(rng, 20000, 32)
    cfg = IndexConfig(nlist=512, M=8, nbits=6, opq=False)
    flat = build.train_baseline(x[:15000], cfg, niter=4)
    hnsw = build.index_from_params(build.extract_params(flat), "ip", Coarse.HNSW)
    baseline = build.train_baseline(x[:15000], dataclasses.replace(cfg, coarse=Coarse.HNSW),
                                    niter=4)
    for index in (hnsw, baseline):
        path = str(tmp_path / "hnsw.index")
        faiss.write_index(index, path)
        back = faiss.read_index(path)
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(back).quantizer)
        assert isinstance(quantizer, faiss.IndexHNSWFlat)
        assert quantizer.hnsw.efSearch == build.HNSW_EF_SEARCH
    exact = faiss.extract_index_ivf(flat).quantizer.search(x[15000:], 1)[1]
    graph = faiss.extract_index_ivf(hnsw).quantizer.search(x[15000:], 1)[1]
    assert (exact == graph).mean() > 0.95
    # the same codebooks: vectors in the same list get the same codes
    np.testing.assert_array_equal(
        build.extract_params(hnsw).codebooks, build.extract_params(flat).codebooks)
    np.testing.assert_array_equal(
        build.extract_params(hnsw).centroids, build.extract_params(flat).centroids)


def test_an_hnsw_assignment_grows_slower_than_the_lists():
    """The cost index.coarse=hnsw bounds: distance computations per assigned vector, counted
    by faiss, grow far slower than nlist (a flat quantizer computes nlist of them)."""
    from pipeline.config import Coarse

    rng = np.random.default_rng(4)
    x = normalized(rng, 2000, 32)
    per_vector = {}
    for nlist in (256, 8192):
        quantizer = build.coarse_quantizer(normalized(rng, nlist, 32), "ip", Coarse.HNSW)
        faiss.cvar.hnsw_stats.reset()
        quantizer.search(x, 1)
        per_vector[nlist] = faiss.cvar.hnsw_stats.ndis / len(x)
    assert per_vector[8192] < 8192 / 4
    assert per_vector[8192] / per_vector[256] < (8192 / 256) / 4, per_vector


@pytest.mark.parametrize("opq", [False, True])
def test_two_level_kmeans_trains_centroids_as_good_as_flat(opq):
    """init.kmeans=two-level: the coarse quantizer holds nlist centroids found by faiss's
    two-level clustering (in the OPQ rotation's space when there is one), which put the
    sample about as close to its centroids as flat k-means does."""
    from pipeline.config import Kmeans

    rng = np.random.default_rng(5)
    centers = normalized(rng, 300, 32)
    x = centers[rng.integers(0, 300, 20000)] + 0.3 * normalized(rng, 20000, 32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = IndexConfig(nlist=256, M=8, nbits=6, opq=opq)
    closeness = {}
    for kmeans in Kmeans:
        index = build.train_baseline(x, cfg, niter=6, kmeans=kmeans, opq_niter=5)
        ivf = faiss.extract_index_ivf(index)
        assert ivf.quantizer.ntotal == 256 and index.is_trained
        rotated = index.chain.at(0).apply(x) if opq else x
        closeness[kmeans] = ivf.quantizer.search(rotated, 1)[0].mean()
    assert closeness[Kmeans.TWO_LEVEL] > 0.97 * closeness[Kmeans.FLAT], closeness
