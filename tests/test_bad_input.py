"""Each user mistake gets a clear error naming the fix, before expensive work, and nothing is
published."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.cli import build as distill
from pipeline.cli.prepare import embedding_table

from .conftest import normalized

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, ids, x):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(embedding_table(np.asarray(ids), x), path)


def run_job(capsys, corpus, out, *extra):
    code = distill.main(["--config", "smoke", "--output", out,
                         "--set", f"data.corpus={corpus}", "--set", "data.train_queries=",
                         "--set", "eval.queries=", "--set", "eval.labels=",
                         "--set", "data.train_sample=2000", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not storage.exists(storage.join(out, "manifest.json")), "nothing may be published"
    assert not storage.exists(storage.join(out, "index")), "nothing may be published"
    return err


def good(tmp_path, n=2000, d=32):
    x = normalized(np.random.default_rng(0), n, d)
    write(str(tmp_path / "c" / "a.parquet"), np.arange(n), x)
    return str(tmp_path / "c"), x


def test_missing_path(tmp_path, capsys):
    assert "does not exist" in run_job(capsys, str(tmp_path / "nope"), str(tmp_path / "o"))


def test_missing_bucket(s3, tmp_path, capsys):
    err = run_job(capsys, "s3://no-such-bucket/corpus", str(tmp_path / "o"))
    assert "does not exist" in err and "bucket" in err


def test_no_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no .parquet" in run_job(capsys, str(tmp_path / "empty"), str(tmp_path / "o"))


def test_wrong_columns(tmp_path, capsys):
    os.makedirs(tmp_path / "c")
    pq.write_table(pa.table({"doc": [1], "vec": [[1.0, 2.0]]}), tmp_path / "c" / "a.parquet")
    err = run_job(capsys, str(tmp_path / "c"), str(tmp_path / "o"))
    assert "missing column" in err and "embedding" in err


def test_dimensions_disagree(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    write(os.path.join(corpus, "b.parquet"), [9999], normalized(np.random.default_rng(1), 1, 16))
    assert "disagree on the dimension" in run_job(capsys, corpus, str(tmp_path / "o"))


def test_nan(tmp_path, capsys, ray_cluster):
    corpus, x = good(tmp_path)
    x[5, 3] = np.nan
    write(os.path.join(corpus, "a.parquet"), np.arange(len(x)), x)
    assert "NaN or inf" in run_job(capsys, corpus, str(tmp_path / "o"))


@pytest.mark.parametrize("damage", ["inf", "duplicate"])
def test_bad_training_queries_fail_in_ingest(tmp_path, capsys, ray_cluster, damage):
    """Training queries are read by tasks, never by the driver: their rows are checked there,
    in ingest, before the warm start."""
    corpus, _ = good(tmp_path)
    q = normalized(np.random.default_rng(2), 300, 32)
    if damage == "inf":
        q[7, 0] = np.inf
        write(str(tmp_path / "q" / "a.parquet"), np.arange(300), q)
    else:
        write(str(tmp_path / "q" / "a.parquet"), np.arange(300), q)
        write(str(tmp_path / "q" / "b.parquet"), [299], q[:1])
    err = run_job(capsys, corpus, str(tmp_path / "o"),
                  "--set", f"data.train_queries={tmp_path / 'q'}")
    if damage == "inf":
        assert "NaN or inf" in err and "q/a.parquet rows 0-300" in err, err
    else:
        assert "data.train_queries: duplicate ids across files [299]" in err, err
    assert "stage init" not in err


def test_duplicate_ids_across_files(tmp_path, capsys, ray_cluster):
    corpus, x = good(tmp_path)
    write(os.path.join(corpus, "b.parquet"), [7], x[:1])
    assert "duplicate ids" in run_job(capsys, corpus, str(tmp_path / "o"))


def test_empty_corpus(tmp_path, capsys):
    write(str(tmp_path / "c" / "a.parquet"), np.zeros(0, np.int64), np.zeros((0, 32), np.float32))
    assert "empty corpus" in run_job(capsys, str(tmp_path / "c"), str(tmp_path / "o"))


def test_k_larger_than_corpus(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    assert "exceed the corpus size" in run_job(capsys, corpus, str(tmp_path / "o"),
                                               "--set", "eval.k=5000")


def test_pq_size_must_divide_d(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set", "index.M=5")
    assert "does not divide" in err and "choose one of" in err


def test_unknown_config_key(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    assert "unknown config key" in run_job(capsys, corpus, str(tmp_path / "o"),
                                           "--set", "index.nlsit=4")


# --- ids, config files, query and label sets, the output, search.py: local and S3 ---

@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3")
        return f"s3://test/bad/{tmp_path.name}"
    return str(tmp_path)


def put_table(uri: str, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue().to_pybytes())


def emb(n: int, d: int = 32) -> pa.Array:
    x = normalized(np.random.default_rng(0), n, d)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)


IDS = {
    "float": (pa.array(np.arange(2000, dtype=np.float64)), "ids must be integers"),
    "bytes": (pa.array([str(i).encode() for i in range(2000)]), "ids must be integers"),
    "null-string": (pa.array([str(i) for i in range(1999)] + [None]), "null ids"),
    "null": (pa.array(list(range(1999)) + [None], pa.int64()), "null ids"),
    "negative": (pa.array(np.arange(2000) - 5, pa.int64()), "negative ids"),
    "minus-one": (pa.array(np.r_[np.arange(1999), -1], pa.int64()), "negative ids"),
    "uint64-2^63": (pa.array(np.r_[np.arange(1999, dtype=np.uint64), np.uint64(1 << 63)]),
                    ">= 2**63"),
}


@pytest.mark.parametrize("kind", IDS)
def test_bad_ids(where, kind, capsys, ray_cluster):
    ids, message = IDS[kind]
    put_table(storage.join(where, "c", "a.parquet"), pa.table({"id": ids, "embedding": emb(2000)}))
    err = run_job(capsys, storage.join(where, "c"), storage.join(where, "o"))
    assert message in err and "a.parquet" in err and "'id'" in err, err


@pytest.mark.parametrize("text, message", [
    ("data:\n  corpus: [unclosed\n", "not valid YAML"),
    ("- data\n- index\n", "must be a mapping"),
])
def test_bad_yaml(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert distill.main(["--config", str(cfg), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(cfg) in err, err
    assert not os.path.exists(tmp_path / "o")


def test_contrastive_weight_is_refused_by_the_pipeline(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set", "loss.contrastive_weight=1")
    assert "bench/quality.py --train-labels" in err


def test_epochs_below_one(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set", "train.epochs=0")
    assert "train.epochs and train.batch_size must be >= 1" in err


@pytest.mark.parametrize("which", ["eval.queries", "data.train_queries", "eval.labels"])
def test_empty_query_or_label_file(where, which, capsys):
    corpus = storage.join(where, "c")
    put_table(storage.join(corpus, "a.parquet"), pa.table({"id": np.arange(2000),
                                                           "embedding": emb(2000)}))
    empty = storage.join(where, which, "part.parquet")
    if which == "eval.labels":
        put_table(empty, pa.table({"query_id": pa.array([], pa.int64()),
                                   "doc_id": pa.array([], pa.int64())}))
    else:
        put_table(empty, pa.table({"id": pa.array([], pa.int64()), "embedding": emb(0)}))
    extra = ["--set", f"{which}={storage.join(where, which)}"]
    if which == "eval.labels":
        put_table(storage.join(where, "q", "a.parquet"), pa.table({"id": np.arange(10),
                                                                   "embedding": emb(10)}))
        extra += ["--set", f"eval.queries={storage.join(where, 'q')}"]
    err = run_job(capsys, corpus, storage.join(where, "o"), *extra)
    assert which in err and "holds no rows" in err, err


def test_output_is_a_file(where, capsys):
    corpus = storage.join(where, "c")
    put_table(storage.join(corpus, "a.parquet"), pa.table({"id": np.arange(2000),
                                                           "embedding": emb(2000)}))
    out = storage.join(where, "out-file")
    storage.write_bytes(out, b"not a folder")
    code = distill.main(["--config", "smoke", "--output", out,
                         "--set", f"data.corpus={corpus}", "--set", "data.train_queries=",
                         "--set", "eval.queries=", "--set", "eval.labels="])
    err = capsys.readouterr().err
    assert code == 2 and "is a file" in err, err
    assert storage.read_bytes(out) == b"not a folder"


def test_labels_nobody_can_match_are_counted(caplog):
    from pipeline.stages.evaluate import label_misses, warn_label_misses

    qrels = {0: {5}, 1: {6, 9999}, 77: {7}}  # query 77 unknown, doc 9999 outside the ids
    counts = label_misses(qrels, np.arange(10), {"a": [0, 499], "b": [500, 999]})
    assert counts == (4, 1, 1)
    with caplog.at_level("WARNING", logger="ivf_distill"):
        warn_label_misses(*counts)
    assert "of 4 labels, 1 name a query" in caplog.text and "and 1 a document" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ivf_distill"):
        warn_label_misses(*label_misses({0: {5}}, np.arange(10), {"a": [0, 999]}))
    assert caplog.text == ""


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """A published-style on-disk index pair of 300 vectors, nlist 8."""
    import faiss

    from pipeline.index import ondisk

    root = tmp_path_factory.mktemp("small")
    x = normalized(np.random.default_rng(1), 300, 32)
    trained = faiss.index_factory(32, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    shard = str(root / "shard.index")
    faiss.write_index(ondisk.encode_shard(trained, np.arange(300), x), shard)
    ondisk.merge_ondisk(trained, [shard], str(root), "index", "index.ivfdata")
    write(str(root / "q" / "q.parquet"), np.arange(3), x[:3])
    return str(root)


@pytest.mark.parametrize("args, message", [
    (["--nprobe", "0"], "--nprobe and -k must be >= 1"),
    (["--nprobe", "-1"], "--nprobe and -k must be >= 1"),
    (["-k", "0"], "--nprobe and -k must be >= 1"),
    (["-k", "301"], "k must be between 1 and the index's 300 vectors"),
])
def test_search_refuses_bad_arguments(small_index, capsys, args, message):
    from pipeline.cli import search

    code = search.main(["--index", small_index, "--queries", f"{small_index}/q", *args])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and out == "", err


def test_search_clamps_nprobe_and_prints_only_results(small_index, tmp_path):
    """Run as a user runs it: stdout holds one line per query and nothing else (faiss's
    "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename" goes to stderr)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "jobs/search.py", "--index", small_index,
                          "--queries", f"{small_index}/q", "-k", "5", "--nprobe", "99"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["0", "1", "2"], res.stdout
    assert all(len(line.split("\t")[1].split()) == 5 for line in lines)
    assert "using 8" in res.stderr and "IO_FLAG_ONDISK_SAME_DIR" in res.stderr


def test_a_bug_keeps_its_traceback_and_a_mistake_is_one_line(smoke_data, tmp_path, ray_cluster):
    """A ValueError of our own code (injected as init's k-means task starts, as numpy raises
    one) is no input error: exit 1 with its traceback. A bad config is: exit 2, one line."""
    import subprocess
    import sys

    from .test_e2e import ROOT, job_args

    env = {**os.environ, "IVF_DISTILL_HOOKS": "tests.fault_hooks",
           "IVF_DISTILL_FAULT_RAISE": "task:_train_baseline", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "jobs/distill.py",
                          *job_args(smoke_data, str(tmp_path / "run"))], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" in res.stderr and "injected at task:_train_baseline" in res.stderr
    assert "error: injected" not in res.stderr  # not told as the user's mistake
    res = subprocess.run([sys.executable, "jobs/distill.py", "--config",
                          "smoke", "--output", str(tmp_path / "r2"),
                          "--set", "index.nlsit=16"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and "nlsit" in res.stderr


def test_inner_product_on_vectors_that_are_not_unit_length_warns():
    """data.metric=ip on unnormalised embeddings (a common slip: cosine meant) draws a warning
    naming the fix; unit vectors and l2 draw none."""
    from pipeline.stages.ingest import norm_warning

    assert norm_warning("ip", [0.999, 1.0, 1.001]) == ""
    assert norm_warning("l2", [3.0, 7.0, 12.0]) == ""
    assert norm_warning("ip", []) == ""
    text = norm_warning("ip", [3.0, 7.0, 12.0])
    assert "L2-normalise" in text and "data.metric=l2" in text and "3 to 12" in text
    assert norm_warning("ip", [0.95, 1.0, 1.0])  # a few short vectors are enough
