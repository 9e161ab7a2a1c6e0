import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import readers

from .conftest import normalized


def _write_fvecs(path, x, kind):
    n, d = x.shape
    body = x.astype(np.float32).view(np.uint8) if kind == "fvecs" else x.astype(np.uint8)
    rows = np.concatenate([np.tile(np.array([d], np.int32).view(np.uint8).reshape(1, 4), (n, 1)),
                           body.reshape(n, -1)], axis=1)
    rows.tofile(path)


@pytest.mark.parametrize("kind", ["fixed", "list", "float16", "npy", "fvecs", "bvecs"])
def test_formats_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = normalized(rng, 50, 8)
    if kind == "bvecs":
        x = rng.integers(0, 255, size=(50, 8)).astype(np.float32)
    ids = np.arange(100, 150)
    if kind in ("fixed", "list", "float16"):
        vals = x.astype(np.float16) if kind == "float16" else x
        typ = pa.list_(pa.float16() if kind == "float16" else pa.float32())
        emb = (pa.FixedSizeListArray.from_arrays(pa.array(vals.ravel()), 8) if kind == "fixed"
               else pa.array(list(vals), type=typ))
        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"id": ids, "embedding": emb}), path, row_group_size=16)
    elif kind == "npy":
        path = tmp_path / "a.npy"
        np.save(path, x)
    else:
        path = tmp_path / f"a.{kind}"
        _write_fvecs(path, x, kind)
    rows, _ = readers.probe(str(path))
    assert rows == 50
    got_ids, got = readers.read_rows(str(path), 10, 37, id_offset=100)
    np.testing.assert_array_equal(got_ids, ids[10:37])
    np.testing.assert_allclose(got, x[10:37], atol=1e-3 if kind == "float16" else 0)


def test_check_block_errors():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        readers.check_block(np.arange(3), np.where(x > 0, np.nan, x), "f")
    with pytest.raises(ValueError, match="duplicate ids"):
        readers.check_block(np.array([1, 1, 2]), x, "f")
    with pytest.raises(ValueError, match="dimension"):
        readers.check_block(np.arange(3), x, "f", d=8)
