"""storage.concat: an object joined from others where they lie (S3 UploadPartCopy through the
local endpoint; copy_file_range locally), as the merge stitches the index."""
import os

import numpy as np
import pytest

from pipeline import storage

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def root(request, s3, tmp_path):
    return f"s3://test/concat/{tmp_path.name}" if request.param == "s3" else str(tmp_path)


def test_concat_equals_the_sources_one_after_another(root):
    rng = np.random.default_rng(0)
    sizes = [6 * MiB, 1 * MiB, 12 * MiB, 3 * MiB, 2 * MiB + 17]
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    srcs = [storage.join(root, f"slice-{i}") for i in range(len(blobs))]
    for uri, blob in zip(srcs, blobs):
        storage.write_bytes(uri, blob)
    dst = storage.join(root, "out", "index.ivfdata")
    moved = storage.concat(srcs, dst)
    assert storage.read_bytes(dst) == b"".join(blobs)
    if storage.is_s3(root):
        # 6 MiB and the last 8 MiB of the 12 MiB source are copied by the store; the small
        # ones (and 4 MiB to make a whole part of the 1 MiB one) pass through this process
        assert moved == {"server_side": 14 * MiB, "through_here": 10 * MiB + 17}
    else:
        assert moved["through_here"] == 0


def test_concat_of_small_sources_and_of_none(root):
    srcs = [storage.join(root, f"s{i}") for i in range(3)]
    for i, uri in enumerate(srcs):
        storage.write_bytes(uri, bytes([i]) * 10)
    storage.concat(srcs, storage.join(root, "a"))
    assert storage.read_bytes(storage.join(root, "a")) == b"\0" * 10 + b"\1" * 10 + b"\2" * 10
    storage.concat([], storage.join(root, "empty"))
    assert storage.read_bytes(storage.join(root, "empty")) == b""


def test_local_concat_leaves_no_partial_file(tmp_path):
    dst = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        storage.concat([str(tmp_path / "missing")], dst)
    assert not os.path.exists(dst)
