"""Incremental rebuild: new and changed corpus files are encoded with the frozen quantizers,
and only they; the index then equals one built in one process over the new corpus."""
import os

import faiss
import numpy as np
import pytest

from pipeline import storage
from pipeline.cli import build as distill
from pipeline.cli import prepare as prepare_data
from pipeline.data import readers
from pipeline.index import build, ondisk
from pipeline.runner import STAGES

from .answers import assert_same_answers
from .conftest import published
from .test_e2e import job_args

pytestmark = pytest.mark.slow


def test_incremental_rebuild(ray_cluster, tmp_path, caplog):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    prepare_data.write_dataset(data, *prepare_data.synthetic(3000, 32), files=3)
    args = job_args(data, out, "--set", "train.epochs=1", "--set", "ray.train_workers=1")
    assert distill.main(args) == 0
    params = os.path.join(out, "stages", "train", "params.npz")
    trained_at = os.path.getmtime(params)
    encoded_at = {p: os.path.getmtime(p) for p in
                  storage.get_fs(out)[0].find(os.path.join(out, "stages", "encode"))
                  if "/done/" in p}

    rng = np.random.default_rng(5)
    corpus = os.path.join(data, "corpus")
    new = rng.standard_normal((500, 32)).astype(np.float32)
    prepare_data.write_table(prepare_data.embedding_table(np.arange(3000, 3500), new),
                             os.path.join(corpus, "part-0003.parquet"))
    changed = rng.standard_normal((1000, 32)).astype(np.float32)  # same ids, new vectors
    prepare_data.write_table(prepare_data.embedding_table(np.arange(1000, 2000), changed),
                             os.path.join(corpus, "part-0001.parquet"))

    with caplog.at_level("INFO", logger="ivf_distill"):
        assert distill.main(args + ["--incremental"]) == 0
    text = caplog.text
    assert "2 of 4 shards new or changed" in text
    assert os.path.getmtime(params) == trained_at  # quantizers frozen
    for marker, t in encoded_at.items():  # the untouched shards were not encoded again
        if os.path.exists(marker) and "part-0001" not in open(marker).read():
            assert os.path.getmtime(marker) == t
    manifest = storage.read_json(os.path.join(out, "manifest.json"))
    assert manifest["counts"]["vectors"] == 3500

    ids, xb = readers.read_all(corpus, "corpus")
    trained = faiss.read_index(os.path.join(out, "stages", "export", "trained.index"))
    single = ondisk.encode_shard(trained, ids, xb)
    merged = faiss.read_index(published(out))  # plain faiss, as a user opens a local run
    _, xq = readers.read_all(os.path.join(data, "eval_queries"), "q")
    for index in (single, merged):
        build.set_nprobe(index, 8)
    assert_same_answers(merged.search(xq, 20), single.search(xq, 20))
    assert_same_answers(merged.search(changed[:20], 1), single.search(changed[:20], 1))

    # The kept quantizers now stand for the new corpus: a plain rerun has nothing to do.
    caplog.clear()
    with caplog.at_level("INFO", logger="ivf_distill"):
        assert distill.main(args) == 0
    assert caplog.text.count("skipped (unchanged)") == len(STAGES), caplog.text[-3000:]
