"""Each user mistake gets a clear error naming the fix, before expensive work, and nothing is
published."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import distill
from jobs.prepare_data import embedding_table
from pipeline import storage

from .conftest import normalized


def write(path, ids, x):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(embedding_table(np.asarray(ids), x), path)


def run_job(capsys, corpus, out, *extra):
    code = distill.main(["--config", "jobs/configs/smoke.yaml", "--output", out,
                         "--set", f"data.corpus={corpus}", "--set", "data.train_queries=",
                         "--set", "data.eval_queries=", "--set", "data.labels=",
                         "--set", "init.train_sample=2000", *extra])
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
