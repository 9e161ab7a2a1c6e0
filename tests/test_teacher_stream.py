"""The training streams over the teacher's parts (pipeline.data.teacher_stream), in one process:
W workers together take exactly the batches one worker takes, each reading about 1/W of the
rows."""
import numpy as np
import pytest

from pipeline.data import teacher_parts
from pipeline.data.teacher_stream import TeacherStream


@pytest.fixture
def parts(tmp_path):
    """Five parts of uneven sizes (the last block of a teacher run is short)."""
    rng = np.random.default_rng(0)
    uris, start = [], 0
    for p, n in enumerate([700, 700, 700, 700, 333]):
        qids = np.arange(start, start + n)
        xq = rng.standard_normal((n, 8)).astype(np.float32)
        S = rng.standard_normal((n, 3)).astype(np.float32)
        I = rng.integers(0, 10_000, (n, 3))
        V = rng.standard_normal((n, 3, 8)).astype(np.float16)
        uri = str(tmp_path / f"part-{p:05d}.parquet")
        teacher_parts.write_table(teacher_parts.teacher_table(qids, xq, S, I, V), uri)
        uris.append(uri)
        start += n
    return uris


def run_epoch(parts, world, streams=8, batch=64, shuffle=512, epoch=3):
    """Per step: the global queries each rank assembles, and each rank's (queries, vectors).
    The ranks' all-gather is stood in for by a first pass that collects their local queries
    (the streams are deterministic)."""
    def make(r, gather):
        return TeacherStream(parts, np.zeros((1, 8), np.float32), streams, r, world, shuffle,
                             gather)

    first = [list(make(r, lambda q: [q] * world).batches(batch, 7, epoch, r, world))
             for r in range(world)]
    ranks, glob = [], []
    for r in range(world):
        step = iter(range(10**6))

        def gather(q, step=step):
            i = next(step)
            return [first[o][i][1] for o in range(world)]

        s = make(r, gather)
        glob.append([g for g, *_ in s.batches(batch, 7, epoch, r, world)])
        ranks.append(s)
    steps = [([glob[r][i] for r in range(world)],
              [(first[r][i][1], first[r][i][2]) for r in range(world)])
             for i in range(len(first[0]))]
    return steps, ranks


def test_two_workers_take_the_batches_of_one(parts):
    one, _ = run_epoch(parts, 1)
    two, ranks = run_epoch(parts, 2)
    assert len(one) == len(two) == (3133 // 8) // 8  # the shortest stream's full pieces
    for (g1, l1), (g2, l2) in zip(one, two):
        # the global batch is the same, in the same order, for every rank
        for g in g2:
            np.testing.assert_array_equal(g, g1[0])
        # the ranks' local batches are the one worker's batch, split: same rows, same vectors
        q1 = l1[0][0]
        q2 = np.concatenate([l2[0][0], l2[1][0]])
        v2 = np.concatenate([l2[0][1], l2[1][1]])
        order1, order2 = np.lexsort(q1.T), np.lexsort(q2.T)
        np.testing.assert_array_equal(q1[order1], q2[order2])
        np.testing.assert_array_equal(l1[0][1][order1], v2[order2])
    # each rank read about half of the rows (whole row groups at the ends of its spans)
    total = ranks[0].parts.rows
    for s in ranks:
        assert 0.45 * total <= s.rows_read <= 0.5 * total + 4 * teacher_parts.ROW_GROUP


def test_one_worker_fetches_every_row_group_once(parts):
    _, (one,) = run_epoch(parts, 1)
    assert one.rows_read == one.parts.rows


def test_epochs_shuffle_differently_and_seeds_repeat(parts):
    a, _ = run_epoch(parts, 1, epoch=0)
    b, _ = run_epoch(parts, 1, epoch=1)
    c, _ = run_epoch(parts, 1, epoch=0)
    assert not np.array_equal(a[0][0][0], b[0][0][0])
    np.testing.assert_array_equal(a[0][0][0], c[0][0][0])


def test_streams_must_split_over_workers(parts):
    with pytest.raises(ValueError, match="multiple of ray.train_workers"):
        TeacherStream(parts, np.zeros((1, 8), np.float32), streams=3, rank=0, world=2)
