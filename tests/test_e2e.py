"""The whole job as a user runs it (jobs/distill.py), on the smoke preset."""
import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from pipeline import storage
from pipeline.cli import build as distill
from pipeline.runner import STAGES

from .answers import assert_same_answers
from .conftest import open_published, published

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tasks placed by node group, as on infra/cluster-aws.yaml (the session's cluster offers both).
GROUPS = ["--set", "ray.gpu_group=gpu_group", "--set", "ray.cpu_group=cpu_group"]


def job_args(data, out, *extra, groups=True):
    return ["--config", "smoke", "--output", out,
            "--set", f"data.corpus={data}/corpus",
            "--set", f"data.train_queries={data}/train_queries",
            "--set", f"eval.queries={data}/eval_queries",
            "--set", f"eval.labels={data}/labels",
            *(GROUPS if groups else []), *extra]


@pytest.fixture
def s3_run(s3_smoke_run):
    return s3_smoke_run


def test_job_publishes_report_and_manifest(s3_run):
    _, out = s3_run
    report = storage.read_json(published(out, "report.json"))
    methods = {r["method"] for r in report["rows"]}
    assert methods == {"faiss-ivf-opq", "distilled-ivf-opq"}
    for r in report["rows"]:
        assert r["bytes_per_vector"] == 3 and r["nlist"] == 16
        assert r["mrr_at_10"] is not None and r["label_recall_at_10"] is not None
    # the method still works end to end: distillation beats faiss's k-means at every nprobe
    by = {(r["method"], r["nprobe"]): r for r in report["rows"]}
    for nprobe in (1, 4, 16):
        faiss_row, ours = by["faiss-ivf-opq", nprobe], by["distilled-ivf-opq", nprobe]
        assert ours["recall_at_10"] > faiss_row["recall_at_10"], (nprobe, faiss_row, ours)
    # Speed for choosing nprobe: at nprobe = nlist (16) a query scans every code of the corpus
    for method in ("faiss-ivf-opq", "distilled-ivf-opq"):
        codes = [by[method, p]["codes_per_query"] for p in (1, 4, 16)]
        assert codes[0] < codes[1] < codes[2] == 4000, (method, codes)
        assert all(by[method, p]["qps_1thread"] > 0 for p in (1, 4, 16))
    assert set(report["wall_seconds"]) >= {"ingest", "train", "merge", "evaluate"}
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["counts"]["vectors"] == 4000
    software = manifest["software"]
    assert software["ivf-distill"] and software["faiss-cpu"] == faiss.__version__
    assert {"torch", "ray", "numpy", "pyarrow", "git_commit"} <= set(software)
    for name, meta in manifest["files"].items():
        local = os.path.join(os.environ.get("TMPDIR", "/tmp"), "check-" + name.replace("/", "_"))
        storage.download_file(storage.join(out, name), local)
        assert storage.sha256_file(local) == meta["sha256"], name
    cfg = storage.read_json(published(out, "config.json"))
    assert cfg["hash"] == manifest["config_hash"]


def test_published_index_opens_with_plain_faiss(s3_run, tmp_path):
    _, out = s3_run
    _download_index(out, tmp_path)
    xq = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    np.save(tmp_path / "xq.npy", xq)
    code = ("import faiss, numpy as np, sys; "
            "ix = faiss.read_index(sys.argv[1], faiss.IO_FLAG_ONDISK_SAME_DIR); "
            "D, I = ix.search(np.load(sys.argv[2]), 10); print(ix.ntotal, int((I >= 0).sum()))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "index.index"),
                          str(tmp_path / "xq.npy")], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-2:] == ["4000", "50"]  # faiss logs the ivfdata path first


def test_rerun_skips_finished_stages(s3_run, caplog):
    data, out = s3_run
    before = storage.read_bytes(storage.join(out, "manifest.json"))
    with caplog.at_level("INFO", logger="ivf_distill"):
        assert distill.main(job_args(data, out)) == 0
    skipped = [r.message for r in caplog.records if "skipped (unchanged)" in r.message]
    assert len(skipped) == len(STAGES)
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before  # no new version


@pytest.mark.parametrize("quantizer, M, faiss_type", [
    ("rq", 3, "IndexIVFResidualQuantizer"), ("lsq", 4, "IndexIVFLocalSearchQuantizer")])
def test_local_output_reads_with_plain_read_index(ray_cluster, smoke_data, tmp_path, quantizer,
                                                  M, faiss_type):
    """The whole job to a local folder with the KDindex-style students: an additive quantizer
    (residual, or LSQ's joint codes), the ranking loss, IVF-aware negatives and Sinkhorn
    balancing, trained by one Ray Train worker; plain faiss opens the index it publishes."""
    out = str(tmp_path / "run")
    assert distill.main(job_args(
        smoke_data, out, "--set", "train.epochs=1", "--set", f"index.quantizer={quantizer}",
        "--set", "index.opq=false", "--set", f"index.M={M}", "--set", "loss.kind=ranking",
        "--set", "negatives.sampler=ivf", "--set", "loss.balance_weight=0.1")) == 0
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    report = json.loads(open(published(out, "report.json")).read())
    assert {r["method"] for r in report["rows"]} == {f"faiss-ivf-{quantizer}",
                                                     f"distilled-ivf-{quantizer}"}
    code = ("import faiss, numpy as np, sys; ix = faiss.read_index(sys.argv[1]); "
            "faiss.extract_index_ivf(ix).nprobe = 4; "
            "D, I = ix.search(np.ones((3, 32), 'float32'), 5); "
            "print(ix.ntotal, I.min() >= 0, type(ix).__name__)")
    res = subprocess.run([sys.executable, "-c", code, os.path.join(out, manifest["index"])],
                         capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4000", "True", faiss_type]


def test_baseline_on_the_sample_encodes_the_corpus_once(ray_cluster, smoke_data, tmp_path):
    """build.baseline=sample: only the distilled index is encoded, merged and published; the
    faiss baseline and the distilled student are compared on the training sample, with its
    own exact neighbours, in rows named apart."""
    out = str(tmp_path / "run")
    assert distill.main(job_args(smoke_data, out, "--set", "build.baseline=sample")) == 0
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert "baseline_index" not in manifest
    assert not any("/baseline/" in f for f in manifest["files"])
    encoded = os.listdir(os.path.join(out, "stages", "encode"))
    assert [e for e in encoded if not e.startswith("_")] == ["distilled-ivfpq"]
    report = json.loads(open(published(out, "report.json")).read())
    by = {(r["method"], r["nprobe"]): r for r in report["rows"]}
    assert {m for m, _ in by} == {"distilled-ivf-opq", "faiss-ivf-opq-sample",
                                  "distilled-ivf-opq-sample"}
    for nprobe in (1, 4, 16):
        for m in ("faiss-ivf-opq-sample", "distilled-ivf-opq-sample"):
            assert 0 < by[m, nprobe]["recall_at_10"] <= 1 and by[m, nprobe]["vectors"] == 4000
            assert by[m, nprobe]["mrr_at_10"] is None  # labels name corpus ids, not the sample's


def test_an_index_in_parts_with_fastscan_is_published_and_searched(ray_cluster, smoke_data,
                                                                    tmp_path):
    """build.output_parts=2 and build.fastscan: each index is published as two parts, each a
    plain faiss index over its lists (and each part's IndexIVFPQFastScan export). Opened
    together they answer as the parts searched one by one and merged do (serving each part
    on its own machine); the fast-scan exports answer as the on-disk parts with the same
    codes do (8-bit look-up tables); evaluate reports both, and the search CLI reads the
    run, one part alone, and the fast-scan exports."""
    import faiss

    from pipeline.cli import search
    from pipeline.data import readers
    from pipeline.index import build, metrics, ondisk

    out = str(tmp_path / "run")
    assert distill.main(job_args(smoke_data, out, "--set", "index.nbits=4", "--set",
                                 "index.M=8", "--set", "build.fastscan=true", "--set",
                                 "build.output_parts=2")) == 0
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert "index" not in manifest and "fastscan_index" not in manifest  # two parts
    headers = [os.path.join(out, h) for h in manifest["index_parts"]]
    fs_paths = [os.path.join(out, f) for f in manifest["fastscan_parts"]]
    assert len(headers) == len(fs_paths) == 2 and len(manifest["baseline_parts"]) == 2
    assert set(manifest["fastscan_parts"]) <= set(manifest["files"])
    code = ("import faiss, sys; ix = faiss.read_index(sys.argv[1]); "
            "print(ix.ntotal, type(faiss.downcast_index(ix.index)).__name__)")
    counts = []
    for path, kind in [(h, "IndexIVFPQ") for h in headers] + \
            [(f, "IndexIVFPQFastScan") for f in fs_paths]:
        res = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                             text=True, cwd="/")
        assert res.returncode == 0, res.stderr
        n, name = res.stdout.split()[-2:]
        assert name == kind
        counts.append(int(n))
    assert counts[0] + counts[1] == counts[2] + counts[3] == 4000 and min(counts) > 0

    xq = np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)
    parts = [ondisk.read_ondisk(h) for h in headers]
    whole = ondisk.open_parts(headers)
    fast = ondisk.join_fastscan([faiss.read_index(f) for f in fs_paths])
    for index in parts + [whole, fast]:
        build.set_nprobe(index, 4)
    heap = faiss.ResultHeap(len(xq), 10, keep_max=True)
    for part in parts:
        heap.add_result(*part.search(xq, 10))
    heap.finalize()
    assert_same_answers(whole.search(xq, 10), (heap.D, heap.I))
    assert metrics.overlap_recall(fast.search(xq, 10)[1], heap.I, 10) > 0.9

    report = json.loads(open(published(out, "report.json")).read())
    by = {(r["method"], r["nprobe"]): r for r in report["rows"]}
    assert {m for m, _ in by} == {"faiss-ivf-opq", "distilled-ivf-opq", "faiss-ivf-opq-fs",
                                  "distilled-ivf-opq-fs"}
    for m, nprobe in by:
        if not m.endswith("-fs"):
            assert by[m, nprobe]["bytes_per_vector"] == 4
            # the quantized tables cost little recall against the float ones
            assert abs(by[m + "-fs", nprobe]["recall_at_10"] - by[m, nprobe]["recall_at_10"]) \
                < 0.05, (m, nprobe)

    np.save(tmp_path / "xq.npy", xq)

    def cli(index, *flags):
        res_uri = str(tmp_path / "res.parquet")
        assert search.main(["--index", index, "--queries", str(tmp_path / "xq.npy"), "-k",
                            "10", "--nprobe", "4", "--out", res_uri, *flags]) == 0
        got = readers._parquet_file(res_uri).read().to_pydict()
        return (np.array(got["score"]).reshape(-1, 10), np.array(got["id"]).reshape(-1, 10))

    assert_same_answers(cli(out), (heap.D, heap.I))
    assert_same_answers(cli(out, "--fastscan"), fast.search(xq, 10))
    assert_same_answers(cli(headers[1]), parts[1].search(xq, 10))


def test_search_cli_answers_from_s3(s3_run, tmp_path):
    from pipeline.cli import search
    from pipeline.data import readers
    from pipeline.index import build

    data, out = s3_run
    res_uri = str(tmp_path / "res.parquet")
    assert search.main(["--index", out, "--queries", f"{data}/eval_queries", "-k", "5",
                        "--nprobe", "4", "--out", res_uri]) == 0
    got = readers._parquet_file(res_uri).read().to_pydict()
    qids, xq = readers.read_all(f"{data}/eval_queries", "q")
    assert len(got["id"]) == len(qids) * 5
    index = open_published(out, tmp_path)
    build.set_nprobe(index, 4)
    assert_same_answers((np.array(got["score"]).reshape(-1, 5), np.array(got["id"]).reshape(-1, 5)),
                        index.search(xq, 5))


def _download_index(out, tmp_path):
    folder = published(out).rsplit("/", 1)[0]
    for name in ("index.index", "index.ivfdata"):
        storage.download_file(f"{folder}/{name}", str(tmp_path / name))
    return str(tmp_path / "index.index")


def _user_table(ids, x, id_name: str, vec_name: str):
    import pyarrow as pa

    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).ravel()),
                                            x.shape[1])
    return pa.table({id_name: ids, vec_name: emb, "title": ids})  # one more column, ignored


def test_string_ids_and_renamed_columns_come_back_as_the_users_ids(ray_cluster, tmp_path):
    """A corpus as people export it: Parquet with string ids in `doc` and vectors in `vec`, and
    queries with no id column at all. The published version maps the index's row numbers back
    to the strings, and both the reader and the search command answer with them."""
    import pyarrow.parquet as pq

    from pipeline.cli.prepare import synthetic
    from pipeline.reader import open_index

    xb, xt, _, xq, _, _ = synthetic(3000, 32)
    names = np.array([f"pkg-{i:05d}" for i in range(len(xb))])
    data = tmp_path / "data"
    for sub in ("corpus", "train", "eval"):
        (data / sub).mkdir(parents=True)
    for p, (a, b) in enumerate([(0, 1200), (1200, 3000)]):  # two files: offsets continue
        pq.write_table(_user_table(names[a:b], xb[a:b], "doc", "vec"),
                       data / "corpus" / f"part-{p}.parquet")
    pq.write_table(_user_table(np.arange(len(xt)), xt, "doc", "vec").drop(["doc", "title"]),
                   data / "train" / "q.parquet")
    pq.write_table(_user_table(np.arange(len(xq)), xq, "doc", "vec").drop(["doc", "title"]),
                   data / "eval" / "q.parquet")
    out = str(tmp_path / "out")
    assert distill.main(["--config", "smoke", "--output", out,
                         "--set", f"data.corpus={data}/corpus",
                         "--set", f"data.train_queries={data}/train",
                         "--set", f"eval.queries={data}/eval", "--set", "eval.labels=",
                         "--set", "data.id_column=doc", "--set", "data.embedding_column=vec",
                         *GROUPS]) == 0
    index = open_index(out)
    scores, ids = index.search(xq[:50], k=5, nprobe=16)
    assert ids.dtype == object and all(str(i).startswith("pkg-") for i in ids.ravel())
    # The index holds row numbers across the files in sorted order; the map names each row
    # by the string its file gave it.
    D, rows = index.faiss.search(np.ascontiguousarray(xq[:50]), 5)
    assert (ids == names[rows]).all() and np.array_equal(D, scores)
    res = subprocess.run([sys.executable, "jobs/search.py", "--index", out, "--queries",
                          f"{data}/eval", "-k", "5", "--nprobe", "16",
                          "--embedding-column", "vec"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    # the same search (k and nprobe) as above: the same answers, ties included
    first = res.stdout.splitlines()[0].split("\t")[1].split()
    assert [h.split(":")[0] for h in first] == list(ids[0])
