"""Fault tests: the job is disturbed (a worker killed, the job killed, the S3 endpoint
restarted, a shard file damaged) and must then answer exactly as an undisturbed run would, or
fail loudly with nothing published.

Each job runs as its own process (`python jobs/distill.py`) with its own local Ray cluster,
as a user runs it, so that killing it is a real kill.
"""
import os
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest
import torch

from infra.local_s3 import free_port
from jobs import prepare_data
from pipeline import storage
from pipeline.config import load_config
from pipeline.data import readers
from pipeline.index import build, ondisk
from pipeline.stages import train as train_stage
from pipeline.stages.common import Run

from .conftest import open_published
from .test_e2e import ROOT, job_args

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def start_job(args: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "jobs/distill.py", *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def run_job(args, log_path, env=None, timeout=600) -> str:
    proc = start_job(args, log_path, env)
    proc.wait(timeout=timeout)
    text = open(log_path).read()
    assert proc.returncode == 0, text[-4000:]
    return text


def kill_when(proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    """SIGKILLs the job's whole process group as soon as `path` exists."""
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, "the job ended before the point where it was to be killed"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def search(out: str, xq: np.ndarray, nprobe: int = 8, local_dir=None) -> np.ndarray:
    index = open_published(out, local_dir)
    build.set_nprobe(index, nprobe)
    return index.search(xq, 20)[1]


def expected_index(out: str, data: str, xq: np.ndarray) -> np.ndarray:
    """What the run's trained index answers when one process encodes the whole corpus."""
    trained = faiss.read_index(storage.join(out, "stages", "export", "trained.index"))
    ids, xb = readers.read_all(f"{data}/corpus", "corpus")
    index = ondisk.encode_shard(trained, ids, xb)
    build.set_nprobe(index, 8)
    return index.search(xq, 20)[1]


@pytest.fixture
def eval_x(smoke_data):
    return readers.read_all(f"{smoke_data}/eval_queries", "q")[1]


def test_killed_encode_worker_is_retried(smoke_data, eval_x, tmp_path):
    out = str(tmp_path / "run")
    text = run_job(job_args(smoke_data, out, "--set", "train.epochs=1"), tmp_path / "log",
                   env={"PIPELINE_FAULT_KILL": f"encode:{tmp_path}"})
    assert os.path.exists(tmp_path / "encode"), "no encode worker was killed"
    assert "total wall time" in text
    np.testing.assert_array_equal(search(out, eval_x), expected_index(out, smoke_data, eval_x))


def test_job_killed_in_training_resumes_from_checkpoint(smoke_data, eval_x, tmp_path,
                                                        ray_cluster):
    out = str(tmp_path / "run")
    args = job_args(smoke_data, out, "--set", "train.epochs=12", "--set", "train.num_workers=1")
    proc = start_job(args, tmp_path / "log1")
    kill_when(proc, os.path.join(out, "stages", "train", "checkpoint.pt"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # nothing published
    text = run_job(args, tmp_path / "log2")
    resumed = [line for line in text.splitlines() if "resuming from" in line]
    assert resumed and "after epoch 0" not in resumed[0], text[-3000:]
    # The resumed training ends where an undisturbed one does: same parameters.
    state = torch.load(os.path.join(out, "stages", "train", "checkpoint.pt"), weights_only=False)
    cfg = load_config("jobs/configs/smoke.yaml", [a for a in args[5::2]])
    ref_run = Run(str(tmp_path / "ref"), cfg)
    for stage in ("ingest", "init", "teacher"):
        ref_run.finish(stage, Run(out, cfg).stage_info(stage), 0.0)
    for stage, name in (("ingest", "sample.npz"), ("init", "baseline.index")):
        storage.write_bytes(ref_run.stage_path(stage, name),
                            storage.read_bytes(os.path.join(out, "stages", stage, name)))
    train_stage.run(ref_run)  # undisturbed, on the same inputs
    ref = torch.load(ref_run.stage_path("train", "checkpoint.pt"), weights_only=False)
    assert state["epoch"] == ref["epoch"] == 12
    for key in ref["best"]:
        np.testing.assert_allclose(state["best"][key], ref["best"][key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    np.testing.assert_array_equal(search(out, eval_x), expected_index(out, smoke_data, eval_x))


def test_job_killed_between_stages_skips_finished_ones(smoke_data, eval_x, tmp_path):
    out = str(tmp_path / "run")
    args = job_args(smoke_data, out, "--set", "train.epochs=1")
    proc = start_job(args, tmp_path / "log1")
    kill_when(proc, os.path.join(out, "stages", "train", "_manifest.json"))
    text = run_job(args, tmp_path / "log2")
    skipped = [s for s in ("ingest", "init", "teacher", "train")
               if f"stage {s}: skipped (unchanged)" in text]
    assert skipped == ["ingest", "init", "teacher", "train"], text[-3000:]
    np.testing.assert_array_equal(search(out, eval_x), expected_index(out, smoke_data, eval_x))


def test_s3_endpoint_restart_mid_run(tmp_path):
    """The endpoint goes away for a few seconds during the job and comes back with the same
    objects (moto keeps them in this process): retries carry the job through."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint}
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="faults")
    data, out = "s3://faults/data", "s3://faults/run"
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        prepare_data.write_dataset(data, *prepare_data.synthetic(4000, 32), files=4)
        proc = start_job(job_args(data, out, "--set", "train.epochs=2"), tmp_path / "log", env)
        fs, _ = storage.get_fs(out)
        t0 = time.time()
        while not fs.exists("faults/run/stages/ingest/_manifest.json"):
            assert proc.poll() is None and time.time() - t0 < 300, open(tmp_path / "log").read()
            time.sleep(0.5)
            fs.invalidate_cache()
        server.stop()  # the endpoint is gone...
        time.sleep(4)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # ...and back, with the same objects
        proc.wait(timeout=600)
        text = open(tmp_path / "log").read()
        assert proc.returncode == 0, text[-4000:]
        local = tmp_path / "published"
        local.mkdir()
        storage.download_file(storage.join(out, "stages/export/trained.index"),
                              str(local / "trained.index"))
        got = open_published(out, local)
        build.set_nprobe(got, 8)
        ref = ondisk.encode_shard(faiss.read_index(str(local / "trained.index")),
                                  *readers.read_all(f"{data}/corpus", "corpus"))
        build.set_nprobe(ref, 8)
        _, xq = readers.read_all(f"{data}/eval_queries", "q")
        np.testing.assert_array_equal(got.search(xq, 20)[1], ref.search(xq, 20)[1])
        manifest = storage.read_json(storage.join(out, "manifest.json"))
        assert manifest["counts"]["vectors"] == 4000
    finally:
        server.stop()
        if saved is not None:
            os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.mark.parametrize("damage", ["truncate-parquet", "corrupt-parquet", "truncate-npy"])
def test_damaged_shard_is_a_clear_error(tmp_path, damage, capsys):
    from jobs import distill

    data = str(tmp_path / "data")
    prepare_data.write_dataset(data, *prepare_data.synthetic(2000, 32), files=2)
    victim = os.path.join(data, "corpus", "part-0001.parquet")
    raw = open(victim, "rb").read()
    if damage == "truncate-parquet":
        open(victim, "wb").write(raw[:len(raw) // 2])
    elif damage == "corrupt-parquet":
        mid = len(raw) // 3
        open(victim, "wb").write(raw[:mid] + bytes(4096) + raw[mid + 4096:])
    else:
        os.remove(victim)
        victim = victim.replace(".parquet", ".npy")
        np.save(victim, np.ones((1000, 32), np.float32))
        open(victim, "r+b").truncate(os.path.getsize(victim) - 1000)
    out = str(tmp_path / "run")
    code = distill.main(job_args(data, out, "--set", "train.epochs=1"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert os.path.basename(victim) in err and ("truncated or corrupt" in err
                                                 or "NaN" in err), err
    assert not os.path.exists(os.path.join(out, "manifest.json"))
