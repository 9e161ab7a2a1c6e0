"""Each Ray stage against its single-process kernel, on a real local Ray cluster."""
import dataclasses
import os

import faiss
import numpy as np
import pytest
import ray
import torch

from pipeline import checkpoint, storage
from pipeline.config import load_config
from pipeline.data import readers
from pipeline.data.plan import Shard, plan_blocks
from pipeline.data.teacher_parts import load_parts
from pipeline.distributed import exact_knn
from pipeline.index import build, knn, ondisk
from pipeline.runner import BY_NAME, stage_context
from pipeline.stages import encode as encode_stage
from pipeline.stages import ingest
from pipeline.workflow.results import Exported
from pipeline.workflow.stage import METHODS, Run

from .answers import assert_same_answers
from .conftest import NodeLoss, normalized


def smoke_cfg(data, *extra):
    return load_config("smoke", [
        f"data.corpus={data}/corpus", f"data.train_queries={data}/train_queries",
        f"eval.queries={data}/eval_queries", f"eval.labels={data}/labels",
        "ray.gpu_group=gpu_group", "ray.cpu_group=cpu_group", *extra])


def _driver_reads(*args, **kwargs):
    raise AssertionError("the driver read rows of a corpus or query file: tasks must")


@dataclasses.dataclass(frozen=True)
class Prepared:
    cfg: object
    run: Run

    def result(self, stage: str):
        return self.run.result(BY_NAME[stage])

    def stage_path(self, *parts):
        return self.run.stage_path(*parts)


def run_stage(cfg, run: Run, name: str, **extra):
    """One stage as the runner runs it (its context from `run`'s records), recorded."""
    result = BY_NAME[name].run(stage_context(cfg, run, BY_NAME[name], key=f"test-{name}",
                                             extra=extra))
    run.finish(name, result, 0.0)
    return result


@pytest.fixture(scope="module")
def prepared(ray_cluster, smoke_data, tmp_path_factory):
    """A run folder with ingest, init and teacher done. The stages run with the driver's
    row reader disabled: the corpus and the training queries are read by tasks only (the
    preflight before them reads metadata)."""
    cfg = smoke_cfg(smoke_data, "negatives.in_batch=false", "train.epochs=1")
    run = Run(str(tmp_path_factory.mktemp("run")))
    plan = ingest.preflight(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readers, "read_rows", _driver_reads)
        run_stage(cfg, run, "ingest", preflight=plan)
        run_stage(cfg, run, "init")
        run_stage(cfg, run, "teacher")
    return Prepared(cfg, run)


def corpus(prepared):
    return readers.read_all(prepared.cfg.data.corpus, "corpus")


def test_teacher_equals_brute_force(prepared):
    ids, xb = corpus(prepared)
    info = prepared.result("teacher")
    parts = load_parts(info.train + info.val)
    assert len(parts["qids"]) == info.queries and len(info.val) == len(info.train)
    assert 0 < info.rows["val"] < info.rows["train"]
    band = knn.Band.of(prepared.cfg.teacher)  # the default band
    assert band is not None
    S, I, V = knn.finish(knn.block_topk(parts["xq"], xb, ids, prepared.cfg.teacher.k, "ip", True,
                                        band=band, qids=parts["qids"]), band)
    np.testing.assert_array_equal(parts["I"], I)
    np.testing.assert_allclose(parts["S"], S, rtol=1e-5)
    np.testing.assert_array_equal(parts["V"], V)


@pytest.mark.parametrize("parts", [1, 3, 16])
def test_encode_and_merge_equal_one_index(prepared, tmp_path, parts):
    """The Ray encode (per shard) and the part writers give the index one process builds:
    the parts, opened together, answer as it does; one part is byte for byte the single-
    process on-disk merge, and the parts' data files, one after another, are its .ivfdata.
    Each part reads each encoded shard in two requests."""
    ids, xb = corpus(prepared)
    trained_uri = prepared.stage_path("init", "baseline.index")
    trained = faiss.read_index(trained_uri)
    shards = [Shard(**s) for s in prepared.result("ingest").shards]
    assert len(shards) == 4
    layout, nlist = str(tmp_path / "enc"), prepared.cfg.index.nlist
    blob = encode_stage._load_index.remote(trained_uri)[1]
    counts = ray.get([encode_stage._encode_shard.remote(dataclasses.asdict(s), [layout], 0.0, blob)
                      for s in shards])
    assert sum(c for r in counts for c in r["counts"]) == len(xb)
    assert {r["device"] for r in counts} == {"cpu"}
    listed = [(f"{layout}/{s.key}.lists", s.rows) for s in shards]
    pieces = ondisk.list_ranges(nlist, parts)
    assert len(pieces) == parts
    out = str(tmp_path / "published")
    done = ray.get([encode_stage._write_part.remote(trained_uri, listed, l0, l1, p, parts, out,
                                                    False)
                    for p, (l0, l1) in enumerate(pieces)])
    assert sum(r["ntotal"] for r in done) == len(xb)
    assert sum(r["requests"] for r in done) == 2 * parts * len(shards)
    headers = [os.path.join(out, ondisk.part_files(p, parts)[0]) for p in range(parts)]
    merged = ondisk.open_parts(headers)
    single = ondisk.encode_shard(trained, ids, xb)
    xq = readers.read_all(prepared.cfg.eval.queries, "q")[1]
    for index in (merged, single):
        build.set_nprobe(index, 8)
    assert merged.ntotal == single.ntotal
    assert_same_answers(merged.search(xq, 50), single.search(xq, 50))
    # the single-process merge of the same shards
    shard_files = []
    for s in shards:
        p = str(tmp_path / f"shard-{s.shard_id}.index")
        sid, sx = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
        faiss.write_index(ondisk.encode_shard(trained, sid, sx), p)
        shard_files.append(p)
    os.makedirs(tmp_path / "ref")
    ref = ondisk.merge_ondisk(trained, shard_files, str(tmp_path / "ref"), "index",
                              "index.ivfdata")
    data = b"".join(open(os.path.join(out, ondisk.part_files(p, parts)[1]), "rb").read()
                    for p in range(parts))
    assert data == open(ref[1], "rb").read()
    if parts == 1:
        assert open(ref[0], "rb").read() == open(headers[0], "rb").read()


def test_encode_is_idempotent_per_shard(prepared, tmp_path):
    """A shard already encoded (its marker written) is not encoded again: retries, resumed
    runs and incremental rebuilds reuse it."""
    trained_uri = prepared.stage_path("init", "baseline.index")
    s = prepared.result("ingest").shards[0]
    layout = str(tmp_path / "enc")
    blob = encode_stage._load_index.remote(trained_uri)[1]
    n = ray.get(encode_stage._encode_shard.remote(s, [layout], 0.0, blob))
    part = f"{layout}/{Shard(**s).key}.lists"
    before = os.path.getmtime(part)
    again = ray.get(encode_stage._encode_shard.remote(s, [layout], 0.0, blob))
    assert again == {"counts": n["counts"], "device": ""}  # nothing left to encode
    assert os.path.getmtime(part) == before


def _copy_inputs(prepared, run: Run, stages=("ingest", "init", "teacher")) -> None:
    """Gives `run` the prepared run's finished stages and the files later stages read."""
    for stage in stages:
        run.finish(stage, prepared.result(stage), 0.0)
    for stage, name in (("ingest", "sample.npz"), ("init", "baseline.index")):
        storage.write_bytes(run.stage_path(stage, name),
                            storage.read_bytes(prepared.stage_path(stage, name)))


def _train(prepared, workers, out, **ray_settings):
    cfg = prepared.cfg.with_values({
        "ray.train_workers": workers, "negatives.in_batch": False, "train.epochs": 2,
        "train.batch_size": 64, **{f"ray.{k}": v for k, v in ray_settings.items()}})
    run = Run(str(out))
    _copy_inputs(prepared, run)  # share the prepared inputs
    info = run_stage(cfg, run, "train")
    state = checkpoint.loads(storage.read_bytes(run.stage_path("train", "checkpoint.npz")))
    return state, info


@pytest.fixture(scope="module")
def one_worker(prepared, tmp_path_factory):
    """Two epochs on one worker, undisturbed: the reference of the training tests."""
    return _train(prepared, 1, tmp_path_factory.mktemp("w1"))


def assert_same_training(s1, s2):
    for key, v1 in s1["model"].items():
        np.testing.assert_allclose(v1.numpy(), s2["model"][key].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def test_two_train_workers_match_one(prepared, one_worker, tmp_path):
    s1, info1 = one_worker
    s2, info2 = _train(prepared, 2, tmp_path / "w2")
    assert s1["epoch"] == s2["epoch"] == 2
    assert_same_training(s1, s2)
    # and training moved the parameters: the comparison is not between two warm starts
    assert not torch.allclose(s1["model"]["codebooks"], torch.as_tensor(
        build.extract_params(storage.read_index(prepared.stage_path("init", "baseline.index")))
        .codebooks))
    assert [h["steps"] for h in info2.history] == [h["steps"] for h in info1.history]


def test_training_survives_losing_its_node(prepared, one_worker, cluster, tmp_path):
    """The node holding the Ray Train worker is lost right after the first epoch's
    checkpoint: Ray Train restarts the worker on the replacement node, which resumes from
    that checkpoint, and the result is the undisturbed run's."""
    loss = NodeLoss(cluster, "train_loss_group", "train-epoch", tmp_path / "hold")
    try:
        state, info = _train(prepared, 1, tmp_path / "run", gpu_group=loss.group)
    finally:
        loss.close()
    s1, info1 = one_worker
    assert state["epoch"] == 2
    # the restarted worker resumed: the first epoch's record is the lost worker's own
    assert len(state["history"]) == 2
    assert_same_training(s1, state)


def test_encode_survives_losing_a_node(prepared, cluster, tmp_path):
    """A node is lost while it encodes shards: Ray retries its tasks on the replacement, and
    each merged index answers as one process encoding the whole corpus."""
    cfg = prepared.cfg.with_values({"ray.cpu_group": "encode_loss_group"})
    run = Run(str(tmp_path / "run"))
    _copy_inputs(prepared, run, ("ingest", "init"))
    run.finish("export", Exported(d=corpus(prepared)[1].shape[1],
                                 bytes_per_vector=4), 0.0)
    trained = {m: run.stage_path(*where) for m, (where, _) in METHODS.items()}
    storage.write_bytes(trained["distilled-ivfpq"], storage.read_bytes(trained["faiss-ivfpq"]))
    loss = NodeLoss(cluster, cfg.ray.cpu_group, "encode", tmp_path / "hold")
    try:
        run_stage(cfg, run, "encode")
        merged = run_stage(cfg, run, "merge")  # on the replacement: the group's only node now
    finally:
        loss.close()
    ids, xb = corpus(prepared)
    xq = readers.read_all(cfg.eval.queries, "q")[1]
    single = ondisk.encode_shard(faiss.read_index(trained["faiss-ivfpq"]), ids, xb)
    build.set_nprobe(single, 8)
    want = single.search(xq, 50)
    for m in METHODS:
        got = ondisk.read_ondisk(os.path.join(merged.indexes[m].uri, "index.index"))
        build.set_nprobe(got, 8)
        assert_same_answers(got.search(xq, 50), want)


def test_pseudo_queries_do_not_find_themselves(prepared, tmp_path):
    """With no data.train_queries, ingest's corpus samples are the training queries and the
    teacher leaves each one's own row out of its list: the lists are the corpus search with
    exclude_self, and no query's row is among its neighbours."""
    cfg = prepared.cfg.with_values({"data.train_queries": "", "data.pseudo_queries": 300})
    run = Run(str(tmp_path / "run"))
    run_stage(cfg, run, "ingest", preflight=ingest.preflight(cfg))
    info = run_stage(cfg, run, "teacher")
    parts = load_parts(info.train + info.val)
    ids, xb = corpus(prepared)
    band = knn.Band.of(cfg.teacher)
    S, I, V = knn.finish(knn.block_topk(parts["xq"], xb, ids, cfg.teacher.k, "ip", True,
                                        band=band, qids=parts["qids"], exclude_self=True), band)
    np.testing.assert_array_equal(parts["I"], I)
    own = {tuple(x): i for i, x in zip(ids, xb)}
    rows = [own[tuple(q)] for q in parts["xq"]]  # every pseudo-query is a corpus row
    assert len(rows) == 300 and not any(r in I[n] for n, r in enumerate(rows))


def _eval_blocks(prepared, size: int = 40) -> list[dict]:
    """The evaluation queries as blocks of at most `size` (the files split evenly)."""
    files = readers.query_files("q", prepared.cfg.eval.queries, corpus(prepared)[1].shape[1])
    return [b.to_dict() for b in plan_blocks(files, size)]


@pytest.mark.parametrize("band", [None, knn.Band(10, 80, 12, seed=5)], ids=["top", "band"])
@pytest.mark.parametrize("workers", [1, 3])
def test_teacher_equals_brute_force_on_any_number_of_workers(prepared, tmp_path, monkeypatch,
                                                             band, workers):
    """1 or 3 search workers over the 4 shards, their results merged in a tree of fan-in 2:
    the same lists and vectors as one search over the whole corpus, and with a band the same
    draw of deeper neighbours."""
    monkeypatch.setattr(exact_knn, "MERGE_FANIN", 2)
    ids, xb = corpus(prepared)
    qids, xq = readers.read_all(prepared.cfg.eval.queries, "q")
    blocks = _eval_blocks(prepared)
    assert len(blocks) > 1
    ray_cfg = dataclasses.replace(prepared.cfg.ray, teacher_workers=workers)
    out = exact_knn.distributed_topk(ray_cfg, "ip", prepared.result("ingest").shards,
                                     blocks, xb.shape[1], 10, str(tmp_path / "t"), "test",
                                     with_vectors=True, band=band)
    assert out["workers"] == workers
    assert len(out["all"]) == len(blocks) and out["rows"]["all"] == len(qids)
    got = load_parts(out["all"])
    S, I, V = knn.finish(knn.block_topk(xq, xb, ids, 10, "ip", True, band=band, qids=qids), band)
    if band:
        assert I.shape[1] == 10 + band.width and (I[:, 10:] >= 0).sum(1).mean() > 6
    np.testing.assert_array_equal(got["I"], I)
    np.testing.assert_array_equal(got["V"], V)
    np.testing.assert_array_equal(got["qids"], qids)
    assert len(load_parts(out["all"], limit=7)["qids"]) == 7


def test_teacher_object_store_bytes_do_not_grow_with_shards(prepared, tmp_path):
    """The same corpus cut into 8 and into 64 shards, searched by 2 workers with the default
    band and neighbour vectors: the same lists, and the same bytes through the object store
    (what moves is each worker's ids and scores per query, and the winners' vectors once),
    where one result per shard and block would move 8 times more with 64 shards."""
    moved, lists = {}, {}
    blocks = _eval_blocks(prepared)
    band = knn.Band.of(prepared.cfg.teacher)
    ray_cfg = dataclasses.replace(prepared.cfg.ray, teacher_workers=2)
    for shards in (8, 64):
        cfg = prepared.cfg.with_values({"data.rows_per_shard": -(-4000 // shards)})
        plan = ingest.preflight(cfg).shards
        assert len(plan) == shards
        out = exact_knn.distributed_topk(ray_cfg, "ip", plan, blocks, 32, 10,
                                         str(tmp_path / str(shards)), "test",
                                         with_vectors=True, band=band)
        moved[shards], lists[shards] = out["object_store_bytes"], load_parts(out["all"])
    np.testing.assert_array_equal(lists[8]["I"], lists[64]["I"])
    np.testing.assert_array_equal(lists[8]["V"], lists[64]["V"])
    nq, slots = lists[8]["I"].shape
    assert moved[8] == moved[64] > nq * slots * 32 * 2  # the winners' vectors move once


def test_bad_query_block_is_the_users_error(prepared, tmp_path):
    """A query block is read and checked by a task; its bad row reaches the user as the
    ValueError that names the setting and the file, not as a remote traceback."""
    import pyarrow.parquet as pq

    from pipeline.cli.prepare import embedding_table

    d = corpus(prepared)[1].shape[1]
    x = normalized(np.random.default_rng(3), 50, d)
    x[20, 1] = np.nan
    (tmp_path / "q").mkdir()
    pq.write_table(embedding_table(np.arange(50), x), tmp_path / "q" / "a.parquet")
    files = readers.query_files("eval.queries", str(tmp_path / "q"), d)
    blocks = [b.to_dict() for b in plan_blocks(files, 20)]
    with pytest.raises(ValueError) as e:
        exact_knn.distributed_topk(prepared.cfg.ray, "ip", prepared.result("ingest").shards,
                                   blocks, d, 10, str(tmp_path / "t"), "evaluate")
    assert not isinstance(e.value, ray.exceptions.RayTaskError)
    msg = str(e.value)
    assert msg.startswith("evaluate: ") and "a.parquet rows 16-33: 1 vector(s) contain NaN" \
        in msg and "Traceback" not in msg, msg


def test_a_sample_too_big_for_one_node_is_refused_before_any_read(ray_cluster):
    """The training sample is joined and trained on by one task: a data.train_sample whose two
    copies exceed a quarter of the largest node's memory fails at the start of ingest, with
    the value that fits."""
    cfg = load_config(None, ["data.corpus=/x", "data.train_sample=1000000000"])
    with pytest.raises(ValueError, match=r"lower data.train_sample to at most \d+"):
        ingest.check_sample_budget(cfg, 2_000_000_000, 768)
    assert "GiB" in ingest.check_sample_budget(cfg.with_values({"data.train_sample": 1000}),
                                              2_000_000_000, 768)


def test_the_driver_holds_a_window_of_task_refs_however_many_tasks(ray_cluster):
    """windowed (encode's shards) keeps at most `window` tasks submitted: the references the
    driver holds are the same for 8 and for 64 tasks, and the results keep their order."""
    from pipeline.distributed import tasks

    square = ray.remote(lambda i: i * i)
    for n in (8, 64):
        peak = []
        out = tasks.windowed([lambda i=i: square.remote(i) for i in range(n)], "squares", 4,
                             peak=peak)
        assert out == [i * i for i in range(n)]
        assert peak == [4]
    assert tasks.task_window() == 2 * int(ray.cluster_resources()["CPU"])
