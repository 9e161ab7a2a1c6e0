"""Ranged reads: storage.read_range is one request for a byte range (S3: one ranged GET through
the local endpoint), and a part writer reads each encoded shard's list range in two of them,
however many lists the range holds."""
import faiss
import numpy as np
import pytest

from pipeline import storage
from pipeline.index import ondisk


@pytest.fixture(params=["local", "s3"])
def root(request, s3, tmp_path):
    return f"s3://test/ranged/{tmp_path.name}" if request.param == "s3" else str(tmp_path)


def test_read_range_returns_that_range(root):
    blob = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    uri = storage.join(root, "blob")
    storage.write_bytes(uri, blob)
    for a, b in [(0, 1), (17, 1 << 20), ((3 << 20) - 5, 3 << 20), (100, 100)]:
        assert storage.read_range(uri, a, b) == blob[a:b]


def _encoded_shards(root: str, n_shards: int, nlist: int):
    rng = np.random.default_rng(1)
    d = 16
    x = rng.standard_normal((4000, d)).astype(np.float32)
    trained = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, 4, 8)
    trained.train(x)
    shards = []
    for s, rows in enumerate(np.array_split(np.arange(len(x)), n_shards)):
        index = ondisk.encode_shard(trained, rows, x[rows])
        local = f"/tmp/shard-{s}.lists"
        with open(local, "wb") as f:
            ondisk.write_lists(index, f)
        uri = storage.join(root, f"shard-{s}.lists")
        storage.upload_file(local, uri)
        shards.append((uri, len(rows)))
    return trained, shards


@pytest.mark.parametrize("parts", [1, 4])
def test_a_part_reads_each_shard_in_two_gets(proxy, tmp_path, parts):
    """Counted at the S3 endpoint: writing `parts` parts from `shards` encoded shards makes
    2 × parts × shards GET requests, and the parts hold every vector once."""
    root = f"s3://test/parts/{tmp_path.name}"
    nlist, n_shards = 64, 5
    trained, shards = _encoded_shards(root, n_shards, nlist)
    ivf = faiss.extract_index_ivf(trained)
    before = len(proxy.seen)
    total = 0
    for p, (l0, l1) in enumerate(ondisk.list_ranges(nlist, parts)):
        lists = [ondisk.ShardLists(lambda a, b, u=uri: storage.read_range(u, a, b), nlist,
                                   ivf.code_size, rows, l0, l1) for uri, rows in shards]
        total += int(ondisk.merge_part(lists, str(tmp_path / f"part-{p}.ivfdata")).sum())
    gets = [r for r in proxy.seen[before:] if r.startswith("GET ")]
    assert len(gets) == 2 * parts * n_shards, gets
    assert len(proxy.seen) - before == len(gets)  # no HEAD, no listing
    assert total == 4000


def test_a_damaged_shard_file_is_refused(tmp_path):
    trained, shards = _encoded_shards(str(tmp_path), 1, 8)
    uri, rows = shards[0]
    raw = bytearray(storage.read_bytes(uri))
    ivf = faiss.extract_index_ivf(trained)

    def lists(data, l0=0, n=rows):
        return ondisk.ShardLists(lambda a, b: bytes(data[a:b]), 8, ivf.code_size, n, l0, 8)

    assert lists(raw).sizes.sum() == rows
    with pytest.raises(ValueError, match="row count"):
        lists(raw, n=rows + 1)
    with pytest.raises(ValueError, match="truncated"):
        lists(raw[:-1]).entries()
    raw[40:48] = np.int64(10 ** 9).tobytes()  # list 0's running size past the shard's rows
    with pytest.raises(ValueError, match="damaged"):
        lists(raw, l0=1)
