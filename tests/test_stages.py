"""Each Ray stage against its single-process kernel, on a real local Ray cluster."""
import dataclasses
import os

import faiss
import numpy as np
import pytest
import ray
import torch

from pipeline import storage
from pipeline.config import load_config
from pipeline.data import readers
from pipeline.index import build, knn, ondisk
from pipeline.stages import build as build_stage
from pipeline.stages import ingest, init, teacher
from pipeline.stages import train as train_stage
from pipeline.stages.common import Run


def smoke_cfg(data, *extra):
    return load_config("jobs/configs/smoke.yaml", [
        f"data.corpus={data}/corpus", f"data.train_queries={data}/train_queries",
        f"data.eval_queries={data}/eval_queries", f"data.labels={data}/labels", *extra])


@pytest.fixture(scope="module")
def prepared(ray_cluster, smoke_data, tmp_path_factory):
    """A run folder with ingest, init and teacher done."""
    cfg = smoke_cfg(smoke_data, "train.in_batch=false", "train.epochs=1")
    run = Run(str(tmp_path_factory.mktemp("run")), cfg)
    plan = ingest.preflight(cfg)
    for name, fn in (("ingest", lambda: ingest.run(run, plan)), ("init", lambda: init.run(run)),
                     ("teacher", lambda: teacher.run(run))):
        run.finish(name, fn(), 0.0)
    return run


def corpus(run):
    return readers.read_all(run.cfg.data.corpus, "corpus")


def test_teacher_equals_brute_force(prepared):
    ids, xb = corpus(prepared)
    parts = teacher.load_parts(prepared.stage_info("teacher")["parts"])
    S, I, V = knn.block_topk(parts["xq"], xb, ids, prepared.cfg.teacher.k, "ip", True)
    np.testing.assert_array_equal(parts["I"], I)
    np.testing.assert_allclose(parts["S"], S, rtol=1e-5)
    np.testing.assert_array_equal(parts["V"], V)


def test_encode_and_merge_equal_one_index(prepared, tmp_path):
    ids, xb = corpus(prepared)
    trained_uri = prepared.stage_path("init", "baseline.index")
    shards = prepared.stage_info("ingest")["shards"]
    assert len(shards) == 4
    uris = [str(tmp_path / f"shard-{s['shard_id']}.index") for s in shards]
    counts = ray.get([build_stage._encode_shard.remote(s, trained_uri, u)
                      for s, u in zip(shards, uris)])
    assert sum(counts) == len(xb)
    out = str(tmp_path / "published")
    res = ray.get(build_stage._merge_method.remote(trained_uri, uris, out))
    assert res["ntotal"] == len(xb)
    merged = faiss.read_index(os.path.join(out, "index.index"))
    single = ondisk.encode_shard(faiss.read_index(trained_uri), ids, xb)
    xq = storage.load_npz(prepared.stage_path("ingest", "eval_queries.npz"))["x"]
    for index in (merged, single):
        build.set_nprobe(index, 8)
    np.testing.assert_array_equal(merged.search(xq, 50)[1], single.search(xq, 50)[1])


def _train(prepared, workers, tmp_path):
    cfg = prepared.cfg
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, num_workers=workers, in_batch=False, epochs=2, batch_size=64))
    run = Run(str(tmp_path / f"w{workers}"), cfg)
    for stage in ("ingest", "init", "teacher"):  # share the prepared inputs
        run.finish(stage, prepared.stage_info(stage), 0.0)
    for stage, name in (("ingest", "sample.npz"), ("init", "baseline.index")):
        storage.write_bytes(run.stage_path(stage, name),
                            storage.read_bytes(prepared.stage_path(stage, name)))
    info = train_stage.run(run)
    state = torch.load(run.stage_path("train", "checkpoint.pt"), weights_only=False)
    return state, info


def test_two_train_workers_match_one(prepared, tmp_path):
    s1, info1 = _train(prepared, 1, tmp_path)
    s2, info2 = _train(prepared, 2, tmp_path)
    assert s1["epoch"] == s2["epoch"] == 2
    for key, v1 in s1["model"].items():
        np.testing.assert_allclose(v1.numpy(), s2["model"][key].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    # and training moved the parameters: the comparison is not between two warm starts
    assert not torch.allclose(s1["model"]["codebooks"], torch.as_tensor(
        build.extract_params(init.load_index(prepared.stage_path("init", "baseline.index")))
        ["codebooks"]))
    assert [h["steps"] for h in info2["history"]] == [h["steps"] for h in info1["history"]]
