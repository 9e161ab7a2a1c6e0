"""Fault tests: the job is disturbed (a worker killed, the job killed, the S3 endpoint
restarted, a shard file damaged) and must then answer exactly as an undisturbed run would, or
fail loudly with nothing published.

Each job runs as its own process (`python jobs/distill.py`), as a user runs it, so that killing
it is a real kill: on the session's multi-node cluster (RAY_ADDRESS), or with a local cluster of
its own where its workers need another S3 endpoint.
"""
import glob
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import faiss
import numpy as np
import pytest

from infra.local_s3 import free_port
from pipeline import checkpoint, publish, storage
from pipeline.cli import build as distill
from pipeline.cli import prepare as prepare_data
from pipeline.data import readers
from pipeline.index import build, ondisk

from . import fault_hooks
from .answers import assert_same_answers
from .conftest import open_published
from .test_e2e import ROOT, job_args

pytestmark = [pytest.mark.faults, pytest.mark.slow]


JOBSITE = os.path.join(ROOT, "tests", "jobsite")  # its sitecustomize: see the file


def start_job(args: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
    log = open(log_path, "w")
    path = os.pathsep.join(p for p in (JOBSITE, os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "jobs/distill.py", *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": path, **(env or {})})


def kill_when(proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    """SIGKILLs the job's whole process group as soon as `path` (a glob pattern) exists."""
    t0 = time.time()
    while not glob.glob(path):
        assert proc.poll() is None, "the job ended before the point where it was to be killed"
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def search(out: str, xq: np.ndarray, nprobe: int = 8, local_dir=None) -> tuple:
    index = open_published(out, local_dir)
    build.set_nprobe(index, nprobe)
    return index.search(xq, 20)


def expected_index(out: str, data: str, xq: np.ndarray) -> tuple:
    """What the run's trained index answers when one process encodes the whole corpus."""
    trained = faiss.read_index(storage.join(out, "stages", "export", "trained.index"))
    ids, xb = readers.read_all(f"{data}/corpus", "corpus")
    index = ondisk.encode_shard(trained, ids, xb)
    build.set_nprobe(index, 8)
    return index.search(xq, 20)


@pytest.fixture
def eval_x(smoke_data):
    return readers.read_all(f"{smoke_data}/eval_queries", "q")[1]


class DisturbedJob:
    """One job through its own S3 endpoint, run as a user runs it (its own process and Ray
    cluster: the session cluster's workers know another endpoint) and disturbed three ways at
    once: an encode worker SIGKILLs itself, the endpoint goes away for 4 s mid-run and comes
    back with the same objects (moto keeps them in this process), and the job's environment
    holds distinctive credentials.

    It touches nothing of this process's environment while it runs, so tests/conftest.py
    starts it as soon as the suite is collected: its minute of work runs beside the other
    tests, which mostly wait on Ray."""

    def __init__(self, tmp: pathlib.Path):
        import boto3
        from moto.server import ThreadedMotoServer

        from tests.conftest import CREDENTIALS

        self.tmp, self.port = tmp, free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        self.s3.create_bucket(Bucket="faults")
        self.data, self.out = "s3://faults/data", "s3://faults/run"
        subprocess.run([sys.executable, "jobs/prepare_data.py", "--synthetic", "4000", "--dim",
                        "32", "--files", "4", "--out", self.data], cwd=ROOT, check=True,
                       env={**os.environ, **self.env}, capture_output=True)
        self.proc = start_job(job_args(self.data, self.out, groups=False), tmp / "log",
                              {**self.env, "IVF_DISTILL_FAULT_KILL": f"encode:{tmp}",
                               "IVF_DISTILL_HOOKS": fault_hooks.HOOKS,
                               "RAY_ADDRESS": ""})
        self.outage = threading.Thread(target=self._outage, daemon=True)
        self.outage.start()

    def _outage(self) -> None:
        from moto.server import ThreadedMotoServer

        while self.proc.poll() is None:
            try:
                self.s3.head_object(Bucket="faults", Key="run/stages/ingest/_manifest.json")
                break
            except Exception:  # noqa: BLE001 - not there yet
                time.sleep(0.5)
        self.cut_mid_run = self.proc.poll() is None
        self.server.stop()  # the endpoint is gone...
        time.sleep(4)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()  # ...and back, with the same objects

    def finish(self) -> dict:
        self.proc.wait(timeout=600)
        self.outage.join()
        text = open(self.tmp / "log").read()
        assert self.proc.returncode == 0, text[-4000:]
        assert self.cut_mid_run, "the job ended before its endpoint went away"
        return {"data": self.data, "out": self.out, "log": text, "tmp": self.tmp}


    def abandon(self) -> None:
        """For a session that ends before its tests ran: no job or endpoint outlives it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.outage.join()
        self.server.stop()


EARLY: dict = {}  # {"disturbed": DisturbedJob} started at collection (tests/conftest.py)


def start_early() -> None:
    folder = tempfile.mkdtemp(prefix="ivf-distill-disturbed-")
    EARLY["disturbed"] = DisturbedJob(pathlib.Path(folder))


def abandon_early() -> None:
    job = EARLY.pop("disturbed", None)
    if job is not None:
        job.abandon()


@pytest.fixture(scope="module")
def disturbed(tmp_path_factory):
    job = EARLY.pop("disturbed", None) or DisturbedJob(tmp_path_factory.mktemp("disturbed"))
    saved = {k: os.environ.get(k) for k in job.env}
    try:
        result = job.finish()
        os.environ.update(job.env)  # the tests read the job's output through its endpoint
        yield result
    finally:
        job.server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_killed_encode_worker_is_retried(disturbed):
    assert os.path.exists(disturbed["tmp"] / "encode"), "no encode worker was killed"
    assert publish.resolve(disturbed["out"])["counts"]["vectors"] == 4000


def test_s3_endpoint_restart_mid_run(disturbed):
    """Retries carried the job through the outage and the killed task: the published index
    answers exactly as one process encoding the whole corpus with its trained index."""
    data, out, local = disturbed["data"], disturbed["out"], disturbed["tmp"] / "published"
    local.mkdir()
    storage.download_file(storage.join(out, "stages/export/trained.index"),
                          str(local / "trained.index"))
    got = open_published(out, local)
    build.set_nprobe(got, 8)
    ref = ondisk.encode_shard(faiss.read_index(str(local / "trained.index")),
                              *readers.read_all(f"{data}/corpus", "corpus"))
    build.set_nprobe(ref, 8)
    _, xq = readers.read_all(f"{data}/eval_queries", "q")
    assert_same_answers(got.search(xq, 20), ref.search(xq, 20))


def test_credentials_never_written_or_logged(disturbed):
    """The S3 credentials of the job's environment appear in no published file, no stage
    file, and no log line (the job's output and its Ray cluster's logs)."""
    from tests.conftest import CREDENTIALS

    fs, root = storage.get_fs(disturbed["out"])
    written = fs.find(root)
    assert any(p.endswith("manifest.json") for p in written)
    texts = {"log": disturbed["log"]}
    for p in written:
        texts[p] = fs.cat_file(p).decode("latin-1")
    for path in glob.glob("/tmp/ray/session_*/logs/**/*", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                texts[path] = f.read().decode("latin-1")
    for name, secret in CREDENTIALS.items():
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"{name} found in {leaks[:5]}"


TWO_EPOCHS = ("--set", "train.epochs=2")  # so that a kill can fall between them


@pytest.fixture(scope="module")
def trained_then_killed(smoke_data, tmp_path_factory, ray_cluster):
    """A job on the session's multi-node cluster, SIGKILLed as soon as training finished:
    its training ran undisturbed (the reference of the resume test) and its lease outlives
    it: for 15 minutes, so that it is still live however long the tests between the kill and
    test_job_killed_between_stages_skips_finished_ones take (the default 120 s was not, once,
    on a busy machine)."""
    tmp = tmp_path_factory.mktemp("between")
    out = str(tmp / "run")
    args = job_args(smoke_data, out, *TWO_EPOCHS, "--set", "publish.lease_seconds=900")
    proc = start_job(args, tmp / "log1")
    kill_when(proc, os.path.join(out, "stages", "train", "_manifest.json"))
    return {"out": out, "args": args, "pid": proc.pid}


def test_job_killed_in_training_resumes_from_checkpoint(smoke_data, eval_x, tmp_path,
                                                        trained_then_killed, caplog):
    """SIGKILLed right after its first epoch's checkpoint (the training worker holds at the
    "train-epoch" fault point until the kill, so the second epoch never starts); the rerun
    takes over the dead job's lease, resumes after that epoch (it does not train it again)
    and ends with the parameters of an undisturbed run on the same inputs. (A job stopped in
    the teacher: tests/test_lease.py.)"""
    out = str(tmp_path / "run")
    args = job_args(smoke_data, out, *TWO_EPOCHS)
    ckpt = os.path.join(out, "stages", "train", "checkpoint.npz")
    hold = tmp_path / "hold"
    hold.mkdir()
    job = start_job(args, tmp_path / "log1", {"IVF_DISTILL_FAULT_HOLD": f"train-epoch:{hold}",
                                              "IVF_DISTILL_HOOKS": fault_hooks.HOOKS})
    kill_when(job, str(hold / "train-epoch-*"))
    killed = checkpoint.loads(open(ckpt, "rb").read())
    assert killed["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # nothing published
    with caplog.at_level("INFO", logger="ivf_distill"):
        assert distill.main(args + ["--break-lease"]) == 0
    assert re.findall(r"resuming from \S+ after epoch (\d+)", caplog.text) == ["1"]
    state = checkpoint.loads(open(ckpt, "rb").read())
    # the first epoch's record is the killed run's own, to the second: it was not retrained
    assert len(state["history"]) == 2 and state["history"][0] == killed["history"][0]
    ref_out = trained_then_killed["out"]
    for stage, name in (("ingest", "sample.npz"), ("init", "baseline.index")):
        same = [open(os.path.join(o, "stages", stage, name), "rb").read() for o in (out, ref_out)]
        assert same[0] == same[1], f"{stage}/{name}: the two runs must share their inputs"
    ref = checkpoint.loads(open(os.path.join(ref_out, "stages", "train", "checkpoint.npz"),
                                "rb").read())
    assert state["epoch"] == ref["epoch"] == 2
    got, want = state["best"].arrays(), ref["best"].arrays()
    assert got.keys() == want.keys() and got["spec"] == want["spec"]
    for key in ("centroids", "codebooks", "rotation"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert_same_answers(search(out, eval_x), expected_index(out, smoke_data, eval_x))


def test_job_killed_between_stages_skips_finished_ones(smoke_data, eval_x, trained_then_killed,
                                                       capsys, caplog):
    """SIGKILLed once training finished: its lease outlives it, so a second job fails at once
    and names it; with --break-lease the rerun skips the finished stages and answers as an
    undisturbed run."""
    out, args = trained_then_killed["out"], trained_then_killed["args"]
    t0 = time.time()
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert f"pid {trained_then_killed['pid']}" in err and "--break-lease" in err, err
    assert time.time() - t0 < 60, "a second job must fail at once, before any work"
    with caplog.at_level("INFO", logger="ivf_distill"):
        assert distill.main(args + ["--break-lease"]) == 0
    skipped = [s for s in ("ingest", "init", "teacher", "train")
               if f"stage {s}: skipped (unchanged)" in caplog.text]
    assert skipped == ["ingest", "init", "teacher", "train"], caplog.text[-3000:]
    assert "taking over a live lease (--break-lease)" in caplog.text
    assert_same_answers(search(out, eval_x), expected_index(out, smoke_data, eval_x))


@pytest.mark.parametrize("damage", ["truncate-parquet", "corrupt-parquet", "truncate-npy"])
def test_damaged_shard_is_a_clear_error(tmp_path, damage, capsys, ray_cluster):
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
