import numpy as np
import pytest

from pipeline.data.plan import plan_shards


@pytest.mark.parametrize("seed", range(30))
def test_shards_cover_every_row_once(seed):
    rng = np.random.default_rng(seed)
    files = [(f"f{i}", int(r)) for i, r in enumerate(rng.integers(0, 50, size=rng.integers(1, 6)))]
    per = int(rng.integers(1, 20))
    shards = plan_shards(files, per)
    assert all(0 < s.rows <= per for s in shards), "no empty or oversized shard"
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    offset = 0
    for uri, rows in files:
        mine = sorted((s.start, s.stop) for s in shards if s.uri == uri)
        covered = [r for a, b in mine for r in range(a, b)]
        assert covered == list(range(rows)), "full coverage, no overlap"
        assert all(s.id_offset == offset for s in shards if s.uri == uri)
        offset += rows


def test_bad_rows_per_shard():
    with pytest.raises(ValueError):
        plan_shards([("a", 3)], 0)
