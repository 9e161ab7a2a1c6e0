"""The quality benchmark's own logic on small seeded data: the extra pseudo-queries' teacher
and the equal-recall comparison (tests/test_quality_guard.py runs its training on real data)."""
import os

import numpy as np
import pytest

from bench import quality
from pipeline.config import load_config


def _cfg():
    return load_config(os.path.join(quality.ROOT, "bench", "quality.yaml"),
                       ["data.corpus=unused", "teacher.k=5", "teacher.band_depth=40",
                        "teacher.band_size=8"])


def test_extra_pseudo_queries_leave_their_own_row_out_and_follow_the_training_queries():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((400, 16)).astype(np.float32)
    ids = np.arange(1000, 1400, dtype=np.int64)
    xt = rng.standard_normal((30, 16)).astype(np.float32)
    rows = np.array([3, 50, 399])
    data = quality.Data(ids, xb, xt, np.arange(1), xt[:1], None, None, False, xb[rows])
    cfg = _cfg()
    S, I, V = quality.teacher_lists(data, cfg)
    assert S.shape[0] == I.shape[0] == V.shape[0] == 33
    alone = quality.teacher_lists(quality.Data(ids, xb, xt, np.arange(1), xt[:1], None, None),
                                  cfg)
    np.testing.assert_array_equal(I[:30], alone[1])  # the training queries' lists unchanged
    for n, row in enumerate(rows):
        assert ids[row] not in I[30 + n]
        # its top k is the exact top k of the corpus without its own row
        others = np.delete(np.arange(len(xb)), row)
        best = others[np.argsort(-(xb[others] @ xb[row]), kind="stable")[:cfg.teacher.k]]
        np.testing.assert_array_equal(I[30 + n, :cfg.teacher.k], ids[best])
    np.testing.assert_array_equal(data.train_queries, np.concatenate([xt, xb[rows]]))


def _row(method, size, nprobe, r10, r100, qps):
    return {"method": method, "bytes_per_vector": size, "nprobe": nprobe,
            "recall_at_10": r10, "recall_at_100": r100, "qps_1thread": qps}


def test_at_equal_recall_picks_the_fastest_distilled_row_with_no_more_bytes(capsys):
    rows = [_row("faiss-ivf-opq", 16, 8, 0.50, 0.60, 1000.0),
            _row("distilled-a", 8, 4, 0.51, 0.55, 5000.0),      # R@10 only, fastest
            _row("distilled-b", 16, 2, 0.52, 0.61, 3000.0),     # both
            _row("distilled-c", 16, 8, 0.60, 0.70, 2000.0),     # both, slower
            _row("distilled-d", 32, 1, 0.90, 0.90, 9000.0)]     # more bytes: never counts
    quality.print_at_equal_recall(rows)
    line = [s for s in capsys.readouterr().out.splitlines() if "faiss-ivf-opq" in s][0]
    assert "R@10 0.5000: distilled-a 8B nprobe 4 x5.00" in line
    assert "R@100 0.6000: distilled-b 16B nprobe 2 x3.00" in line
    quality.print_at_equal_recall([_row("faiss-x", 8, 1, 0.5, 0.5, 10.0),
                                   _row("distilled-y", 8, 1, 0.4, 0.6, 10.0)])
    out = capsys.readouterr().out
    assert "R@10 0.5000: -" in out and "R@100 0.5000: distilled-y 8B nprobe 1 x1.00" in out


@pytest.mark.parametrize("name, size, want", [
    ("ivf-rq-b32r", 8, 8), ("ivf-rq-b64r", 8, 8), ("ivf-prq", 16, 16), ("ivf-plsq", 8, 8),
    ("ivf-lsq-x2", 16, 16),
    # anchors at their own bytes, at 384-d: 1 bit a dimension and 8 B of corrections; 4 bits;
    # 64 bits after PCA to 64-d and the same corrections
    ("ivf-rabitq", 8, 56), ("ivf-rabitq-4", 8, 212), ("pca64-ivf-rabitq", 8, 16),
])
def test_strong_baselines_store_the_bytes_their_rows_compare(name, size, want):
    import faiss

    index = quality.strong_index(name, 384, size, 16, "ip")
    assert quality.code_bytes(index) == want
    inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    if "-rq-b" in name:  # full strength: the beam in training and encoding, refined codebooks
        rq = inner.rq
        assert rq.max_beam_size == int(name[len("ivf-rq-b"):-1]) and rq.use_beam_LUT == 1
        assert rq.train_type & faiss.ResidualQuantizer.Train_refine_codebook
    if name == "ivf-lsq-x2":
        default = faiss.LocalSearchQuantizer(384, size, 8)
        assert inner.lsq.train_iters == 2 * default.train_iters
        assert inner.lsq.encode_ils_iters == 2 * default.encode_ils_iters


def test_an_anchor_trains_and_searches_with_its_codes():
    """The 1-bit anchor on tiny data: what the benchmark adds and searches holds 56 B codes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = quality.strong_index("ivf-rabitq", 384, 8, 16, "ip")
    index.train(x)
    index.add(x)
    import faiss

    faiss.extract_index_ivf(index).nprobe = 16
    D, I = index.search(x[:20], 10)
    assert (I[:, 0] == np.arange(20)).mean() >= 0.9  # each finds itself among 2,000, 1 bit
    assert faiss.extract_index_ivf(index).invlists.code_size == 56
